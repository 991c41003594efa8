"""The dashboard's start form, generated from a process's input JSON Schema: the fields each
schema gives, how posted strings become typed input, where each error is shown, and the page
around it when a start is refused."""

from __future__ import annotations

import html
import json
import re
from types import SimpleNamespace
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.template.loader import render_to_string
from django.test import Client

from audit.models import Event
from console import start_form
from console.start_form import Field
from orchestration import demo as demo_data
from orchestration.models import Process, Run, Task

RICH = {
    "type": "object", "additionalProperties": False,
    "required": ["name", "amount", "count", "kind", "address"],
    "properties": {
        "name": {"type": "string", "title": "Full name", "description": "As on the invoice.",
                 "minLength": 2, "maxLength": 80, "pattern": "^[A-Za-z -]+$"},
        "notes": {"type": "string", "maxLength": 5000},
        "amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
        "count": {"type": "integer", "minimum": 1, "maximum": 9},
        "price": {"type": "number", "multipleOf": 0.01},
        "kind": {"enum": ["goods", "services", 3]},
        "urgent": {"type": "boolean"},
        "contact": {"type": "string", "format": "email"},
        "address": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "maxLength": 50},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
        "extra": {"type": "object", "properties": {"note": {"type": "string", "maxLength": 20},
                                                   "flag": {"type": "boolean"}}},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "scores": {"type": "array", "items": {"type": "integer", "maximum": 10}},
        "lines": {"type": "array", "items": {"type": "object"}},
        "either": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    },
}
GOOD = {"in/name": "Kim Lee", "in/amount": "12.5", "in/count": "3", "in/kind": "1",
        "in/address/city": "Berlin"}



def _by_path(fields: list[Field]) -> dict[str, Field]:
    return {item.dotted: item for item in start_form.walk(fields)}


def _read(posted: dict[str, str], schema: dict[str, Any] = RICH) -> tuple[
        Any, list[str], dict[str, Field]]:
    fields = start_form.fields_for(schema)
    data, general = start_form.read(schema, fields, posted)
    return data, general, _by_path(fields)


def _posted(fields: list[Field]) -> dict[str, str]:
    """What a browser posts for the fields as shown (a checked box as "on")."""
    posted: dict[str, str] = {}
    for item in start_form.walk(fields):
        if item.widget == "checkbox":
            if item.checked:
                posted[item.name] = "on"
        elif item.widget != "group":
            posted[item.name] = item.value
    return posted


# --- schema → fields -------------------------------------------------------------------------


def test_it_maps_each_kind_of_property_to_its_field() -> None:
    fields = _by_path(start_form.fields_for(RICH))
    assert {name: f.widget for name, f in fields.items()} == {
        "name": "text", "notes": "textarea", "amount": "number", "count": "number",
        "price": "number", "kind": "select", "urgent": "checkbox", "contact": "text",
        "address": "group", "address.city": "text", "address.zip": "text", "extra": "group",
        "extra.note": "text", "extra.flag": "checkbox", "tags": "list", "scores": "list",
        "lines": "json", "either": "json"}
    name = fields["name"]
    assert (name.label, name.help, name.required) == ("Full name", "As on the invoice.", True)
    assert name.attrs == {"maxlength": "80", "minlength": "2", "pattern": "^[A-Za-z \\-]+$"}
    assert fields["notes"].attrs == {"maxlength": "5000"} and not fields["notes"].required
    # An exclusive bound is shown as the inclusive one (the server refuses the bound itself).
    assert fields["amount"].attrs == {"step": "any", "min": "0", "max": "1000"}
    assert fields["count"].attrs == {"step": "1", "min": "1", "max": "9"}
    assert fields["price"].attrs == {"step": "0.01"}
    assert fields["kind"].choices == [("0", "goods"), ("1", "services"), ("2", "3")]
    assert fields["contact"].input_type == "email"
    assert fields["address"].required and fields["address.city"].required
    assert not fields["address.zip"].required and not fields["extra"].required
    assert fields["address.zip"].name == "in/address/zip"
    assert fields["address.zip"].attrs == {"pattern": "^[0-9]{5}$"}


def test_it_shows_the_schemas_defaults_filled_in() -> None:
    schema = {"type": "object", "properties": {
        "region": {"enum": ["eu", "us"], "default": "us"},
        "urgent": {"type": "boolean", "default": True},
        "limit": {"type": "integer", "default": 10},
        "who": {"type": "object", "properties": {"team": {"type": "string", "default": "ops"}}},
        "tags": {"type": "array", "items": {"type": "string"}, "default": ["a", "b"]},
        "plain": {"type": "string"}}}
    fields = _by_path(start_form.fields_for(schema))
    assert {k: (f.value, f.checked) for k, f in fields.items()} == {
        "region": ("1", False), "urgent": ("", True), "limit": ("10", False), "who": ("", False),
        "who.team": ("ops", False), "tags": ("a\nb", False), "plain": ("", False)}


def test_it_edits_objects_nested_too_deep_and_schemas_without_properties_as_json() -> None:
    deep: dict[str, Any] = {"type": "object", "properties": {"leaf": {"type": "string"}}}
    for _ in range(start_form.MAX_DEPTH):
        deep = {"type": "object", "properties": {"inner": deep}}
    fields = _by_path(start_form.fields_for(deep))
    assert fields["inner.inner.inner"].widget == "group"
    assert fields["inner.inner.inner.inner"].widget == "json"
    assert start_form.fields_for({"type": "object"}) == []
    assert start_form.fields_for(["not", "a", "schema"]) == []


def test_it_names_and_identifies_fields_whatever_their_property_names() -> None:
    schema = {"type": "object", "properties": {
        "a/b": {"type": "string"}, "a": {"type": "object", "properties": {"b": {"type": "string"}}},
        "a.b": {"type": "string"}, "a-b": {"type": "string"}, "a_b": {"type": "string"}}}
    fields = [f for f in start_form.walk(start_form.fields_for(schema)) if f.widget != "group"]
    assert [f.name for f in fields] == ["in/a~1b", "in/a/b", "in/a.b", "in/a-b", "in/a_b"]
    ids = [f.html_id for f in fields]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"start-[A-Za-z0-9_-]+", i) for i in ids)
    data, general, _ = _read({"in/a~1b": "1", "in/a/b": "2", "in/a.b": "3"}, schema)
    assert data == {"a/b": "1", "a": {"b": "2"}, "a.b": "3"} and general == []


@pytest.mark.parametrize("pattern, shown", [
    ("^[A-Z]{2}$", "^[A-Z]{2}$"),
    ("^[A-Z0-9-]{3,40}$", "^[A-Z0-9\\-]{3,40}$"),  # v mode wants the literal dash escaped
    ("^[^@\\s]+@[^@\\s]+$", "^[^\\@\\s]+@[^\\@\\s]+$"),
    ("^[]a]$", "^[\\]a]$"),
    ("^[^^]$", "^[^\\^]$"),
    ("^(?:ab|cd)+$", "^(?:ab|cd)+$"),
    ("[A-Z]{2}", ""),  # unanchored: the schema searches, the browser would match the whole
    ("^ab", ""),
    ("^(?P<x>a)$", ""),  # Python only
    ("^a\\-b$", ""),  # an identity escape a browser refuses outside a class
    ("^[a-z$", ""),
])
def test_it_gives_the_browser_only_patterns_it_reads_as_the_schema_does(pattern: str,
                                                                          shown: str) -> None:
    assert start_form.browser_pattern(pattern) == shown
    if shown:  # what the browser gets still means what the schema says
        for text in ("AB", "ORD-1", "a@b", "]", "^", "abcd", "x"):
            assert bool(re.fullmatch(shown, text)) == bool(re.search(pattern, text)), text


@pytest.mark.parametrize("spec", demo_data.PROCESSES, ids=lambda s: s["slug"])
def test_each_demo_process_offers_its_example_and_reads_it_back(spec: dict[str, Any]) -> None:
    schema = spec["input_schema"]
    example = start_form.example_of(schema)
    assert example == spec["example"]
    fields = start_form.fields_for(schema)
    assert {f.key for f in fields} == set(schema["properties"])
    assert all(f.widget in ("text", "textarea", "number", "checkbox") for f in fields)
    start_form.fill(fields, example)
    data, general = start_form.read(schema, fields, _posted(fields))
    expected = dict(example)
    if "force_low_confidence" in schema["properties"]:
        expected["force_low_confidence"] = False  # an unticked box is false
    assert (data, general) == (expected, [])


# --- form strings → typed input, and the errors ------------------------------------------------


def test_it_coerces_form_strings_to_the_schemas_types() -> None:
    data, general, _ = _read({**GOOD, "in/price": "10.25", "in/urgent": "on",
                              "in/notes": "line one\r\nline two", "in/tags": "a\n\n b \n",
                              "in/scores": "1\n2", "in/lines": '[{"sku": "A"}]',
                              "in/either": "7", "in/extra/note": ""})
    assert general == []
    assert data == {"name": "Kim Lee", "notes": "line one\nline two", "amount": 12.5,
                    "count": 3, "price": 10.25, "kind": "services", "urgent": True,
                    "address": {"city": "Berlin"}, "tags": ["a", "b"], "scores": [1, 2],
                    "lines": [{"sku": "A"}], "either": 7}
    assert isinstance(data["count"], int) and isinstance(data["amount"], float)
    # An optional group left empty is left out; a required one is there, empty, and its own
    # required fields say so.
    data, _, fields = _read({**GOOD, "in/address/city": ""})
    assert data is None
    assert fields["address.city"].error == "address.city is required"


@pytest.mark.parametrize("name, raw, error", [
    ("amount", "abc", "amount must be a number"),
    ("amount", "NaN", "amount must be a finite number"),
    ("amount", "Infinity", "amount must be a finite number"),
    ("amount", "1" * 41, "amount is too long for a number"),
    ("count", "2.5", "count must be a whole number"),
    ("count", "two", "count must be a whole number"),
    ("kind", "7", "kind must be one of the listed options"),
    ("kind", "-1", "kind must be one of the listed options"),
    ("scores", "1\nten", "scores line 2 must be a whole number"),
    ("lines", "[{", "lines is not valid JSON: Expecting property name enclosed in double "
                    "quotes (line 1, column 3)"),
    ("lines", '[{"a": NaN}]', "lines refused: NaN is not allowed at 0/a (numbers must be "
                              "finite)"),
])
def test_it_refuses_a_value_it_cannot_read_beside_its_field(name: str, raw: str,
                                                           error: str) -> None:
    data, general, fields = _read({**GOOD, f"in/{name}": raw})
    assert data is None and general == []
    assert fields[name].error == error
    assert fields[name].value == raw  # what was typed is kept
    assert [f.dotted for f in fields.values() if f.error] == [name]


@pytest.mark.parametrize("posted, name, error", [
    ({"in/name": ""}, "name", "name is required"),
    ({"in/name": "K"}, "name", "name must be at least 2 characters long"),
    ({"in/name": "Kim 2"}, "name", "name does not have the expected form (pattern "
                                   "^[A-Za-z -]+$)"),
    ({"in/amount": "0"}, "amount", "amount must be more than 0"),
    ({"in/amount": "1000.5"}, "amount", "amount must be at most 1000"),
    ({"in/count": "0"}, "count", "count must be at least 1"),
    ({"in/price": "1.001"}, "price", "price 1.001 is not a multiple of 0.01"),
    ({"in/address/zip": "1234"}, "address.zip",
     "address.zip does not have the expected form (pattern ^[0-9]{5}$)"),
    ({"in/tags": "a\nb\nc\nd"}, "tags", "tags takes at most 3 items"),
    ({"in/scores": "1\n11"}, "scores", "scores.1 must be at most 10"),
    ({"in/either": "[1]"}, "either", "either [1] is not valid under any of the given schemas"),
])
def test_it_shows_each_schema_error_beside_the_field_it_concerns(posted: dict[str, str],
                                                                 name: str, error: str) -> None:
    data, general, fields = _read({**GOOD, **posted})
    assert data is None and general == []
    assert fields[name].error == error
    assert [f.dotted for f in fields.values() if f.error] == [name]


def test_it_refuses_what_no_schema_refuses_beside_its_field() -> None:
    data, general, fields = _read({**GOOD, "in/name": "Kim\x00"})
    assert data is None and general == []
    assert fields["name"].error == ("name refused: a NUL character (\\u0000) in a string is not "
                                    "allowed at input/name (it cannot be stored)")
    data, general, fields = _read({**GOOD, "in/amount": "9" * 20})
    assert fields["amount"].error.startswith("amount refused: a number out of range")
    data, general, fields = _read({**GOOD, "in/lines": "[" * 70 + "]" * 70})
    assert fields["lines"].error.startswith(
        "lines refused: nesting deeper than 64 levels is not allowed at 0/0/0/")


def test_it_reports_an_error_no_field_holds_by_its_path() -> None:
    fields = start_form.fields_for(RICH)
    general = start_form.place(fields, [((), "must be an object"),
                                        (("ghost", "x"), "is not expected")])
    assert general == ["input must be an object", "ghost.x is not expected"]


def test_it_renders_every_kind_of_field_with_its_errors() -> None:
    fields = start_form.fields_for(RICH)
    start_form.read(RICH, fields, {**GOOD, "in/address/city": "", "in/tags": "x\n<b>y</b>",
                                   "in/lines": "[", "in/urgent": "on"})
    text = render_to_string("console/dashboard.html#start_form", {"start": {
        "process": SimpleNamespace(slug="rich", description=""), "fields": fields,
        "has_example": False, "json_text": "{}", "errors": []}})
    assert re.search(r'<fieldset id="start-address" class="field-group">\s*<legend>address '
                     r'<abbr class="required"', text)
    city = _tag(text, "start-address-city")
    assert 'name="in/address/city"' in city and "required" in city
    assert 'aria-invalid="true"' in city
    assert re.search(r'id="start-address-city-error" role="alert">address.city is required<',
                     text)
    assert "(one per line)" in text and "x\n&lt;b&gt;y&lt;/b&gt;</textarea>" in text
    assert re.search(r'id="start-lines-error" role="alert">lines is not valid JSON', text)
    assert re.search(r'<textarea id="start-lines" name="in/lines" rows="3" spellcheck="false"'
                     r'[^>]*>\n\[</textarea>', text)
    assert 'type="email" id="start-contact"' in text
    assert 'type="checkbox" id="start-urgent" name="in/urgent" checked' in text
    assert '<option value="1" selected>services</option>' in text
    assert '<option value="2">3</option>' in text
    assert 'id="start-name-help">As on the invoice.</small>' in text
    assert "Full name <abbr" in text
    assert 'id="start-fill-example"' not in text  # no example, no button


# --- the dashboard's start card -------------------------------------------------------------


@pytest.fixture
def signed_in(client: Client, operator: User) -> Client:
    client.force_login(operator)
    return client


def _counts() -> tuple[int, int, int]:
    return Run.objects.count(), Task.objects.count(), Event.objects.count()


def _tag(text: str, element_id: str) -> str:
    found = re.search(rf'<[a-z]+ [^>]*id="{re.escape(element_id)}"[^>]*>', text)
    assert found, f"no element #{element_id}"
    return found.group(0)


REFUND = {"in/order_id": "ORD-1042", "in/amount": "40", "in/reason": "damaged",
          "in/customer_email": "kim@example.com"}


def test_the_dashboard_shows_the_chosen_processes_form(signed_in: Client) -> None:
    text = signed_in.get("/").content.decode()
    first = Process.objects.order_by("slug").first()
    assert first is not None
    assert f'data-process="{first.slug}"' in text  # the first process, unless one is chosen
    text = signed_in.get("/?process=refund-exception").content.decode()
    assert 'data-process="refund-exception"' in text
    amount = _tag(text, "start-amount")
    for attr in ('type="number"', 'name="in/amount"', 'step="any"', 'min="0"',
                 'max="100000"', "required"):
        assert attr in amount
    order = _tag(text, "start-order_id")
    assert 'pattern="^[A-Z0-9\\-]{3,40}$"' in order and "required" in order
    assert 'maxlength="500"' in _tag(text, "start-reason")
    assert 'id="start-json"' in text and "Advanced: edit as JSON" in text
    assert 'id="start-fill-example"' in text
    assert 'value="ORD-1042"' not in order
    # An unknown process is not an error on the dashboard: it shows the first one's form.
    text = signed_in.get("/?process=nope\x00").content.decode()
    assert f'data-process="{first.slug}"' in text


def test_it_fills_in_the_example_on_request(signed_in: Client) -> None:
    text = signed_in.get("/?process=refund-exception&example=1").content.decode()
    assert 'value="ORD-1042"' in _tag(text, "start-order_id")
    assert 'value="40"' in _tag(text, "start-amount")
    text = signed_in.get("/?process=contract-review&example=1").content.decode()
    assert "9.1 Liability is limited" in text


def test_the_process_select_swaps_in_the_processes_form(signed_in: Client) -> None:
    response = signed_in.get("/runs/start/form?process=contract-review&example=1",
                             HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    text = response.content.decode()
    assert text.lstrip().startswith('<div id="start-form"')
    assert "<html" not in text and "dashboard-figures" not in text
    assert 'data-process="contract-review"' in text
    assert 'type="checkbox" id="start-force_low_confidence"' in text
    assert 'value="Northwind Traders"' in _tag(text, "start-counterparty")
    # Without htmx, the dashboard showing that form.
    response = signed_in.get("/runs/start/form?process=contract-review&example=1")
    assert response.status_code == 302
    assert response["Location"] == "/?process=contract-review&example=1#start"
    response = signed_in.get("/runs/start/form")  # none named: the first one
    assert response.status_code == 302
    assert response["Location"] == "/?process=contract-review#start"
    for slug, status in (("nope", 404), ("nope\x00", 404)):
        assert signed_in.get(f"/runs/start/form?process={slug}",
                             HTTP_HX_REQUEST="true").status_code == status


def test_the_form_is_refused_to_whoever_may_not_start_the_process(client: Client,
                                                                  demo: None) -> None:
    client.force_login(User.objects.create_user("outsider", password="outsider-password"))
    assert client.get("/runs/start/form?process=refund-exception",
                      HTTP_HX_REQUEST="true").status_code == 403
    before = _counts()
    assert client.post("/runs/start", {"process": "refund-exception", **REFUND}).status_code == 403
    assert _counts() == before
    assert "Start a run" not in client.get("/").content.decode()


def test_it_starts_a_run_from_the_generated_form(signed_in: Client, operator: User) -> None:
    response = signed_in.post("/runs/start", {"process": "refund-exception", **REFUND})
    assert response.status_code == 302
    run = Run.objects.get()
    assert response["Location"] == f"/runs/{run.pk}/"
    assert run.created_by == operator
    assert run.input == {"order_id": "ORD-1042", "amount": 40, "reason": "damaged",
                         "customer_email": "kim@example.com"}
    response = signed_in.post("/runs/start", {
        "process": "contract-review", "in/contract_text": "9.1 Liability\r\nis capped.",
        "in/counterparty": "Northwind", "in/value": "2500.50", "in/force_low_confidence": "on"})
    assert response.status_code == 302
    run = Run.objects.get(pk=response["Location"].split("/")[2])
    assert run.input == {"contract_text": "9.1 Liability\nis capped.", "counterparty":
                         "Northwind", "value": 2500.5, "force_low_confidence": True}


def test_a_refused_start_shows_the_dashboard_with_the_error_beside_the_field(
        signed_in: Client) -> None:
    before = _counts()
    posted = {**REFUND, "in/amount": "abc", "in/reason": "</textarea><script>x()</script>",
              "in/order_id": "ord 1"}
    response = signed_in.post("/runs/start", {"process": "refund-exception", **posted})
    assert response.status_code == 400
    assert _counts() == before
    text = response.content.decode()
    # The whole dashboard, figures and runs list included, with the form as it was posted.
    assert 'id="dashboard-figures"' in text and 'id="runs-list"' in text
    assert 'data-process="refund-exception"' in text
    assert 'selected>Refund exception' in text
    assert re.search(r'id="start-amount-error" role="alert">amount must be a number<', text)
    assert 'aria-invalid="true"' in _tag(text, "start-amount")
    assert 'value="ord 1"' in _tag(text, "start-order_id")
    assert html.escape(posted["in/reason"]) in text
    assert "<script>x()" not in text
    # A value that reads but breaks the schema: beside its field too, by name.
    response = signed_in.post("/runs/start", {"process": "refund-exception",
                                              **{**REFUND, "in/amount": "0"}})
    assert response.status_code == 400
    assert re.search(r'id="start-amount-error" role="alert">amount must be more than 0<',
                     response.content.decode())
    response = signed_in.post("/runs/start", {"process": "refund-exception",
                                              **{**REFUND, "in/order_id": ""}})
    assert re.search(r'id="start-order_id-error" role="alert">order_id is required<',
                     response.content.decode())
    assert _counts() == before


def test_a_refused_json_start_keeps_the_dashboard_and_the_json_open(signed_in: Client) -> None:
    before = _counts()
    response = signed_in.post("/runs/start", {"process": "refund-exception",
                                              "input": '{"amount": NaN}'})
    assert response.status_code == 400
    text = response.content.decode()
    assert 'id="dashboard-figures"' in text
    assert '<details id="start-json" open>' in text
    assert "Input refused: NaN is not allowed at input/amount" in text
    assert html.escape('{"amount": NaN}') in text
    assert _counts() == before


def test_it_refuses_a_nul_in_a_field_beside_it(signed_in: Client) -> None:
    before = _counts()
    response = signed_in.post("/runs/start", {"process": "refund-exception",
                                              **{**REFUND, "in/reason": "dam\x00aged"}})
    assert response.status_code == 400
    assert "reason refused: a NUL character" in response.content.decode()
    assert _counts() == before


def test_the_demo_examples_are_in_the_published_schemas(demo: None) -> None:
    for spec in demo_data.PROCESSES:
        version = Process.objects.get(slug=spec["slug"]).current_version
        assert version is not None
        assert start_form.example_of(version.input_schema) == spec["example"]
        assert json.loads(json.dumps(version.input_schema))["examples"] == [spec["example"]]


@pytest.mark.parametrize("typed", ["1e999999999", "-1E400", "1e-999999"])
def test_a_number_with_a_huge_exponent_is_refused_before_it_is_expanded(typed: str) -> None:
    with pytest.raises(ValueError, match="out of range"):
        start_form._number(typed, False)
    assert start_form._number("2.5e3", True) == 2500

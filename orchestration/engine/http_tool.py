"""HTTP tools: a contract whose implementation is an HTTP endpoint.

Credentials are injected into the request at call time; they never appear in the arguments, so
neither the model nor the ledger sees them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import httpx

from orchestration.engine.contracts import ToolContract


def http_contract(
    *, name: str, method: str, url_template: str, input_schema: Mapping[str, Any],
    output_schema: Mapping[str, Any], timeout_s: float, idempotent: bool,
    credential: Callable[[], str] | None = None, description: str = "",
    cost_per_call: Decimal = Decimal("0"),
) -> ToolContract:
    method = method.upper()

    def call(*, idempotency_key: str | None = None, **args: Any) -> Any:
        used = set()
        url = url_template
        for key, value in args.items():
            token = "{" + key + "}"
            if token in url:
                url = url.replace(token, quote(str(value), safe=""))
                used.add(key)
        rest = {k: v for k, v in args.items() if k not in used}
        headers = {"Accept": "application/json"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        if credential is not None:
            headers["Authorization"] = f"Bearer {credential()}"
        with httpx.Client(timeout=timeout_s) as client:
            if method in ("GET", "DELETE"):
                response = client.request(method, url, params=rest, headers=headers)
            else:
                response = client.request(method, url, json=rest, headers=headers)
        if response.status_code >= 400:
            raise RuntimeError(f"HTTP {response.status_code} from {method} {url}")
        return response.json()

    return ToolContract(name=name, fn=call, input_schema=input_schema, output_schema=output_schema,
                        timeout_s=timeout_s, idempotent=idempotent, description=description,
                        cost_per_call=cost_per_call)

"""Switchboard settings. The environment is read here and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured
from django.utils.csp import CSP

from console.credentials import credentials_take
from console.env import (
    database_from_url,
    envbool,
    envchoice,
    envheader,
    envint,
    envlist,
    envnetworks,
    envorigins,
    envstr,
    envtimezone,
)

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = envbool("DEBUG", False)
# The key signing sessions and CSRF tokens. The development key below is public (it is in this
# file), so with DEBUG=false start-up refuses to run without a key of its own: scripts/demo and
# scripts/test make one once into .secret-key (gitignored), the test suite sets its own.
DEVELOPMENT_SECRET_KEY = "switchboard-insecure-development-key-set-SECRET_KEY-in-production"
SECRET_KEY = envstr("SECRET_KEY", "").strip()
if not SECRET_KEY or SECRET_KEY == DEVELOPMENT_SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set (or is the public development key) and DEBUG is false: set "
            "SECRET_KEY to a long random secret, e.g. the output of python -c 'import secrets; "
            "print(secrets.token_urlsafe(50))', or DEBUG=true on a development machine")
    SECRET_KEY = DEVELOPMENT_SECRET_KEY
# The test client's "testserver" is not here: Django's test set-up adds it for tests only.
ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])

# Behind HTTPS (set these in a deployment that serves over TLS; all off by default so the
# plain-HTTP demo on 127.0.0.1 works):
# SESSION_COOKIE_SECURE / CSRF_COOKIE_SECURE=true send the cookies over HTTPS only;
# SECURE_HSTS_SECONDS=31536000 (+ SECURE_HSTS_INCLUDE_SUBDOMAINS, SECURE_HSTS_PRELOAD) tells
# browsers to use HTTPS only; SECURE_SSL_REDIRECT=true redirects plain HTTP to HTTPS.
SESSION_COOKIE_SECURE = envbool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = envbool("CSRF_COOKIE_SECURE", False)
SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = envbool("SECURE_HSTS_PRELOAD", False)
SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", False)
# SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto: https": a request (and a websocket) carrying this
# header counts as HTTPS. Set it only behind a proxy that sets the header on every request and
# drops it from clients, or anyone can claim HTTPS.
SECURE_PROXY_SSL_HEADER = envheader("SECURE_PROXY_SSL_HEADER")
# CSRF_TRUSTED_ORIGINS=https://console.example.com,...: origins (scheme://host[:port]) allowed
# to POST besides the request's own, e.g. when a proxy rewrites the Host header.
CSRF_TRUSTED_ORIGINS = envorigins("CSRF_TRUSTED_ORIGINS", [])
# Websockets (console/routing.py) are accepted from the page's own origin (the same scheme, a
# host in ALLOWED_HOSTS and the same port as the socket's Host header) and from the origins
# listed here, compared exactly: scheme, host and port (a wildcard entry matches nothing).
# Defaults to CSRF_TRUSTED_ORIGINS.
SWITCHBOARD_WS_ALLOWED_ORIGINS = envorigins("SWITCHBOARD_WS_ALLOWED_ORIGINS",
                                            CSRF_TRUSTED_ORIGINS)
# Sign-in throttling (console/auth_views.py) counts failures per client address. Behind a
# reverse proxy every request comes from the proxy: list its addresses or networks here
# (SWITCHBOARD_TRUSTED_PROXIES=10.0.0.5,10.1.0.0/16) and X-Forwarded-For is read, but only on
# requests from those peers, taking the right-most address that is not a trusted proxy.
SWITCHBOARD_TRUSTED_PROXIES = envnetworks("SWITCHBOARD_TRUSTED_PROXIES")

REDIS_URL = envstr("REDIS_URL", "")
# Standalone: SQLite, in-memory channel layer, run work on a thread pool inside the web process.
# Distributed: PostgreSQL, Redis (broker + channel layer), Celery workers.
SWITCHBOARD_MODE = "distributed" if REDIS_URL else "standalone"
SWITCHBOARD_WORKER_THREADS = envint("SWITCHBOARD_WORKER_THREADS", 4, minimum=1)
SWITCHBOARD_DEMO_PASSWORD = envstr("SWITCHBOARD_DEMO_PASSWORD", "switchboard")
# Credentials for providers and HTTP tools, referenced by name (credential_ref) and never shown:
# SWITCHBOARD_CREDENTIAL_OPENAI=sk-... makes the credential "openai". Once read they are taken
# out of the environment, so no process the server starts inherits them.
SWITCHBOARD_CREDENTIALS = credentials_take("SWITCHBOARD_CREDENTIAL_")
# The run_python sandbox (orchestration/engine/sandbox.py): bubblewrap, and the unprivileged
# uid/gid sandboxed code runs as. Without a working bubblewrap run_python refuses to run.
SWITCHBOARD_SANDBOX_BWRAP = envstr("SWITCHBOARD_SANDBOX_BWRAP", "bwrap")
SWITCHBOARD_SANDBOX_UID = envint("SWITCHBOARD_SANDBOX_UID", 65534, minimum=1)
SWITCHBOARD_SANDBOX_GID = envint("SWITCHBOARD_SANDBOX_GID", 65534, minimum=1)

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "django_htmx",
    "guardian",
    "audit",
    "approvals",
    "orchestration",
    "knowledge",
    "console",
]

MIDDLEWARE = [
    # First, so that every response, whatever answered it, carries X-Request-ID.
    "console.middleware.request_id_middleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "console.time_zones.time_zone_middleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "console.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
            # {{ value|when }} on every page without a {% load %}.
            "builtins": ["console.templatetags.times"],
        },
    },
]
ASGI_APPLICATION = "console.asgi.application"
WSGI_APPLICATION = "console.wsgi.application"

DATABASES = {
    "default": database_from_url(
        envstr("DATABASE_URL", ""), sqlite_default_path=str(BASE_DIR / "switchboard.sqlite3")
    )
}
# Test databases carry the process id, so test runs side by side never share one. On SQLite it
# must be a file, not shared memory: tests run work on threads with their own connections.
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    DATABASES["default"]["TEST"] = {
        "NAME": str(BASE_DIR / f".test-switchboard-{os.getpid()}.sqlite3")}
else:
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{os.getpid()}"}
    # Workers keep their connection between tasks (a new one costs more than a whole step);
    # the health check drops one that a database restart broke.
    DATABASES["default"]["CONN_MAX_AGE"] = envint("SWITCHBOARD_DB_CONN_MAX_AGE", 300, minimum=0)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "guardian.backends.ObjectPermissionBackend",
]
ANONYMOUS_USER_NAME = None
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
# TIME_ZONE=Europe/Paris: the zone pages show times in (an IANA name; an unknown one stops
# start-up). Each person may choose their own at /settings/time-zone/. Stored times, the API and
# the ledger stay in UTC.
TIME_ZONE = envtimezone("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False
X_FRAME_OPTIONS = "DENY"
# Scripts and styles come only from our own static files: no inline script, no eval, no CDN.
# Untrusted text (model output, tool results, run input) is escaped on every path; this is the
# second line of defence if it ever is not.
SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF],
    "style-src": [CSP.SELF],
    "img-src": [CSP.SELF, "data:"],
    "connect-src": [CSP.SELF],
    "font-src": [CSP.SELF],
    "object-src": [CSP.NONE],
    "base-uri": [CSP.NONE],
    "form-action": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
}
SECURE_CONTENT_TYPE_NOSNIFF = True

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # socket_timeout: redis-py reads with a 5 s timeout unless told otherwise, and a
            # consumer waits for its messages with a 5 s BZPOPMIN: the answer and the timeout
            # raced, and on a loaded machine the timeout won and took the consumer (and its
            # socket) down. Reads wait well past the longest blocking command.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 30}]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

CELERY_BROKER_URL = REDIS_URL or "memory://"
# Publishing gives up fast when the broker is away (the outbox keeps the message); a message a
# killed worker had taken comes back from the outbox relay long before Redis's visibility
# timeout would return it.
if REDIS_URL:
    CELERY_BROKER_TRANSPORT = "console.broker:Transport"
CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_timeout": 5, "socket_connect_timeout": 2,
                                   "visibility_timeout": 600}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# A worker logs through LOGGING below (console/celery.py applies it); Celery leaves it alone.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Recovery (orchestration/sweep.py, orchestration/leases.py): a running task's lease lasts
# SWITCHBOARD_LEASE_SECONDS and is renewed every third of that; every worker process runs the
# sweep every SWITCHBOARD_SWEEP_SECONDS (one at a time), which takes over expired leases and
# relays outbox messages not handled within SWITCHBOARD_REDELIVER_SECONDS. A lost worker's task
# restarts within lease + sweep seconds (15 s by default). A task that was running on
# SWITCHBOARD_POISON_CRASHES lost workers escalates to a person (poison_task).
SWITCHBOARD_LEASE_SECONDS = envint("SWITCHBOARD_LEASE_SECONDS", 10, minimum=1)
SWITCHBOARD_SWEEP_SECONDS = envint("SWITCHBOARD_SWEEP_SECONDS", 5, minimum=1)
SWITCHBOARD_REDELIVER_SECONDS = envint("SWITCHBOARD_REDELIVER_SECONDS", 15, minimum=1)
SWITCHBOARD_POISON_CRASHES = envint("SWITCHBOARD_POISON_CRASHES", 3, minimum=1)
# Model conversations (the prompts sent, redacted) are kept beside the ledger for the trace
# page for SWITCHBOARD_TRANSCRIPT_RETENTION_DAYS, then the sweep deletes their text; the ledger
# keeps each one's digest and the model's answer, which is all a replay needs.
SWITCHBOARD_TRANSCRIPT_RETENTION_DAYS = envint("SWITCHBOARD_TRANSCRIPT_RETENTION_DAYS", 30,
                                               minimum=1)
if SWITCHBOARD_TRANSCRIPT_RETENTION_DAYS > 36_500:
    raise ImproperlyConfigured("SWITCHBOARD_TRANSCRIPT_RETENTION_DAYS must be at most 36500 "
                               "(100 years)")
# How long a worker keeps the work in hand through a database outage before giving it up to
# the sweep.
SWITCHBOARD_DB_RETRY_SECONDS = envint("SWITCHBOARD_DB_RETRY_SECONDS", 60, minimum=0)
# The knowledge base's exact vector scan (PostgreSQL without pgvector) reads at most this many
# live chunks of a collection; beyond it search asks the administrator to install pgvector.
SWITCHBOARD_KNOWLEDGE_SCAN_LIMIT = envint("SWITCHBOARD_KNOWLEDGE_SCAN_LIMIT", 50_000, minimum=1)
# Collections whose embedder is "openai": any OpenAI-compatible /embeddings endpoint (empty:
# the SDK's default), and the model asked; the key is the credential "embeddings".
SWITCHBOARD_EMBEDDINGS_BASE_URL = envstr("SWITCHBOARD_EMBEDDINGS_BASE_URL", "").strip()
if SWITCHBOARD_EMBEDDINGS_BASE_URL and urlsplit(
        SWITCHBOARD_EMBEDDINGS_BASE_URL).scheme not in ("http", "https"):
    raise ImproperlyConfigured("SWITCHBOARD_EMBEDDINGS_BASE_URL must be an http:// or https:// "
                               "URL, e.g. https://api.openai.com/v1")
SWITCHBOARD_EMBEDDINGS_MODEL = (envstr("SWITCHBOARD_EMBEDDINGS_MODEL", "").strip()
                                or "text-embedding-3-small")
# Hosts a document may be fetched from by URL although they resolve to a private or loopback
# address (an intranet wiki); every other host must resolve to public addresses only
# (knowledge/url_fetch.py). Empty by default.
SWITCHBOARD_KNOWLEDGE_FETCH_ALLOWED_HOSTS = envlist("SWITCHBOARD_KNOWLEDGE_FETCH_ALLOWED_HOSTS",
                                                    [])

# The most one raise_budget decision may add (approvals/services.py): a reviewer's typo or a
# hostile client cannot hand a run an unbounded budget, nor one the budget columns cannot hold
# (cost has 14 digits, 6 of them decimals). Cost is in whole currency units; the steps ceiling
# also bounds tool_calls.
SWITCHBOARD_MAX_BUDGET_RAISE_COST = envint("SWITCHBOARD_MAX_BUDGET_RAISE_COST", 10_000, minimum=1)
SWITCHBOARD_MAX_BUDGET_RAISE_TOKENS = envint("SWITCHBOARD_MAX_BUDGET_RAISE_TOKENS", 10_000_000,
                                             minimum=1)
SWITCHBOARD_MAX_BUDGET_RAISE_STEPS = envint("SWITCHBOARD_MAX_BUDGET_RAISE_STEPS", 1_000, minimum=1)
SWITCHBOARD_MAX_BUDGET_RAISE_WALL_S = envint("SWITCHBOARD_MAX_BUDGET_RAISE_WALL_S", 86_400,
                                             minimum=1)
if SWITCHBOARD_MAX_BUDGET_RAISE_COST > 99_999_999:
    raise ImproperlyConfigured("SWITCHBOARD_MAX_BUDGET_RAISE_COST must be at most 99999999, "
                               "the largest budget the cost columns hold")

# Notifications for reviewers (console/notifications.py): when an approval request opens for a
# group, and once when its deadline nears, the group's members who may decide it get an email
# (unless they opted out on their Notifications page) and every active webhook configured in the
# admin gets a signed JSON POST. Both go through the outbox: a delivery that fails is tried
# again after SWITCHBOARD_NOTIFY_RETRY_SECONDS, doubling each time (at most an hour), up to
# SWITCHBOARD_NOTIFY_MAX_ATTEMPTS attempts, then recorded as failed in the admin's delivery log.
# The deadline notice goes out when less than SWITCHBOARD_NOTIFY_DEADLINE_PERCENT of the time a
# request was given remains. SWITCHBOARD_BASE_URL (scheme://host[:port]) is where the links in
# notifications point. SWITCHBOARD_NOTIFY_EMAIL=false sends no email at all.
SWITCHBOARD_BASE_URL = envorigins("SWITCHBOARD_BASE_URL", ["http://127.0.0.1:8000"])
if len(SWITCHBOARD_BASE_URL) != 1:
    raise ImproperlyConfigured("SWITCHBOARD_BASE_URL must be one origin, scheme://host[:port]")
SWITCHBOARD_BASE_URL = SWITCHBOARD_BASE_URL[0]
SWITCHBOARD_NOTIFY_EMAIL = envbool("SWITCHBOARD_NOTIFY_EMAIL", True)
SWITCHBOARD_NOTIFY_DEADLINE_PERCENT = envint("SWITCHBOARD_NOTIFY_DEADLINE_PERCENT", 20,
                                             minimum=1)
if SWITCHBOARD_NOTIFY_DEADLINE_PERCENT > 99:
    raise ImproperlyConfigured("SWITCHBOARD_NOTIFY_DEADLINE_PERCENT must be between 1 and 99")
SWITCHBOARD_NOTIFY_MAX_ATTEMPTS = envint("SWITCHBOARD_NOTIFY_MAX_ATTEMPTS", 8, minimum=1)
SWITCHBOARD_NOTIFY_RETRY_SECONDS = envint("SWITCHBOARD_NOTIFY_RETRY_SECONDS", 30, minimum=1)
# A webhook must answer within this many seconds (redirects are not followed).
SWITCHBOARD_WEBHOOK_TIMEOUT_SECONDS = envint("SWITCHBOARD_WEBHOOK_TIMEOUT_SECONDS", 10,
                                             minimum=1)
if SWITCHBOARD_WEBHOOK_TIMEOUT_SECONDS > 120:
    raise ImproperlyConfigured("SWITCHBOARD_WEBHOOK_TIMEOUT_SECONDS must be at most 120")
# Email (Django's MAILERS): SWITCHBOARD_EMAIL_BACKEND is smtp (the default when EMAIL_HOST is
# set), console (the default otherwise: messages are written to the server's output), file (into
# the directory EMAIL_FILE_PATH), locmem or dummy. SMTP reads EMAIL_HOST, EMAIL_PORT (25),
# EMAIL_HOST_USER, EMAIL_HOST_PASSWORD and EMAIL_USE_TLS or EMAIL_USE_SSL; a server must answer
# within EMAIL_TIMEOUT seconds (10). SWITCHBOARD_EMAIL_FROM is the sender.
_EMAIL_BACKENDS = {"smtp": "django.core.mail.backends.smtp.EmailBackend",
                   "console": "django.core.mail.backends.console.EmailBackend",
                   "file": "django.core.mail.backends.filebased.EmailBackend",
                   "locmem": "django.core.mail.backends.locmem.EmailBackend",
                   "dummy": "django.core.mail.backends.dummy.EmailBackend"}
_email_host = envstr("EMAIL_HOST", "").strip()
_email_backend = envchoice("SWITCHBOARD_EMAIL_BACKEND", tuple(_EMAIL_BACKENDS),
                           "smtp" if _email_host else "console")
SWITCHBOARD_EMAIL_TIMEOUT_SECONDS = envint("EMAIL_TIMEOUT", 10, minimum=1)
_email_options: dict[str, object] = {}
if _email_backend == "smtp":
    _email_options = {"host": _email_host or "localhost",
                      "port": envint("EMAIL_PORT", 25, minimum=1),
                      "username": envstr("EMAIL_HOST_USER", ""),
                      "password": envstr("EMAIL_HOST_PASSWORD", ""),
                      "use_tls": envbool("EMAIL_USE_TLS", False),
                      "use_ssl": envbool("EMAIL_USE_SSL", False),
                      "timeout": SWITCHBOARD_EMAIL_TIMEOUT_SECONDS}
    if _email_options["use_tls"] and _email_options["use_ssl"]:
        raise ImproperlyConfigured("set at most one of EMAIL_USE_TLS and EMAIL_USE_SSL")
elif _email_backend == "file":
    _email_options = {"file_path": envstr("EMAIL_FILE_PATH", "").strip()}
    if not _email_options["file_path"]:
        raise ImproperlyConfigured("SWITCHBOARD_EMAIL_BACKEND=file needs EMAIL_FILE_PATH, the "
                                   "directory messages are written to")
MAILERS = {"default": {"BACKEND": _EMAIL_BACKENDS[_email_backend], "OPTIONS": _email_options}}
DEFAULT_FROM_EMAIL = envstr("SWITCHBOARD_EMAIL_FROM", "switchboard@localhost").strip()
if "@" not in DEFAULT_FROM_EMAIL or any(c in DEFAULT_FROM_EMAIL for c in "\r\n"):
    raise ImproperlyConfigured(f"SWITCHBOARD_EMAIL_FROM={DEFAULT_FROM_EMAIL!r} is not an email "
                               "address")
SERVER_EMAIL = DEFAULT_FROM_EMAIL

# Prometheus metrics at /metrics (console/metrics.py). A scrape is answered only when it comes
# from SWITCHBOARD_METRICS_ALLOW (addresses or networks, default loopback; "0.0.0.0/0,::/0"
# for anywhere; empty turns /metrics off) and, when SWITCHBOARD_METRICS_TOKEN is set (16+
# characters), carries "Authorization: Bearer <token>". The client address honours
# SWITCHBOARD_TRUSTED_PROXIES. Other scrapes get 404 (address) or 403 (token).
SWITCHBOARD_METRICS_ALLOW = envnetworks("SWITCHBOARD_METRICS_ALLOW", ["127.0.0.1", "::1"])
SWITCHBOARD_METRICS_TOKEN = envstr("SWITCHBOARD_METRICS_TOKEN", "").strip()
if SWITCHBOARD_METRICS_TOKEN and (len(SWITCHBOARD_METRICS_TOKEN) < 16
                                  or any(c.isspace() for c in SWITCHBOARD_METRICS_TOKEN)):
    raise ImproperlyConfigured("SWITCHBOARD_METRICS_TOKEN must be at least 16 characters with "
                               "no spaces, e.g. python -c 'import secrets; "
                               "print(secrets.token_urlsafe(32))'")
# Distributed: Celery worker processes count tasks, calls and tokens where the web server cannot
# see them. Give every process (web and workers) the same PROMETHEUS_MULTIPROC_DIR, an empty
# directory wiped at each deployment start, and /metrics adds up all their figures. Unset
# (standalone, one process), /metrics shows the serving process's own.
SWITCHBOARD_METRICS_MULTIPROC_DIR = envstr("PROMETHEUS_MULTIPROC_DIR", "").strip()
if SWITCHBOARD_METRICS_MULTIPROC_DIR and not (
        os.path.isdir(SWITCHBOARD_METRICS_MULTIPROC_DIR)
        and os.access(SWITCHBOARD_METRICS_MULTIPROC_DIR, os.W_OK)):
    raise ImproperlyConfigured(
        f"PROMETHEUS_MULTIPROC_DIR={SWITCHBOARD_METRICS_MULTIPROC_DIR!r} is not a writable "
        "directory; create it (empty) before starting the server and the workers")
# /health/ready counts a worker as up when one wrote its heartbeat (every sweep round) within
# this many seconds (distributed mode).
SWITCHBOARD_WORKER_HEARTBEAT_SECONDS = envint(
    "SWITCHBOARD_WORKER_HEARTBEAT_SECONDS", max(30, 3 * SWITCHBOARD_SWEEP_SECONDS), minimum=1)
# Probes and scrapes are answered over plain HTTP even with SECURE_SSL_REDIRECT on.
SECURE_REDIRECT_EXEMPT = [r"^health/(live|ready)$", r"^metrics$"]

# Logs go to stderr, one line per record, each with the run id, task key, request id and trace
# id of the work it was written in (logcontext). SWITCHBOARD_LOG_FORMAT=json writes each as a
# JSON object (the default in distributed mode, for a log collector), text as a line for people
# (the default in standalone mode). LOG_LEVEL is the level of everything else (Django, Celery,
# daphne; a worker's --loglevel sets Celery's own), SWITCHBOARD_LOG_LEVEL that of Switchboard.
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
SWITCHBOARD_LOG_FORMAT = envchoice("SWITCHBOARD_LOG_FORMAT", ("json", "text"),
                                   "json" if SWITCHBOARD_MODE == "distributed" else "text")

# Traces (console/tracing.py): OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318 exports one
# trace per run over OTLP/HTTP (to its /v1/traces) from the web process (service.name
# switchboard-web) and every worker (switchboard-worker): spans for tasks, model calls and
# tool calls with the GenAI semantic conventions' attributes. Unset, no tracer is installed.
# The SDK's own OTEL_* variables (e.g. OTEL_BSP_SCHEDULE_DELAY, OTEL_EXPORTER_OTLP_HEADERS)
# apply as documented by OpenTelemetry.
OTEL_EXPORTER_OTLP_ENDPOINT = envstr("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "logcontext.ContextFilter"}},
    "formatters": {
        "json": {"()": "logcontext.JsonFormatter"},
        "text": {"()": "logcontext.TextFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                             "formatter": SWITCHBOARD_LOG_FORMAT, "filters": ["context"]}},
    "root": {"handlers": ["console"],
             "level": envchoice("LOG_LEVEL", LOG_LEVELS, "warning").upper()},
    "loggers": {
        "switchboard": {"level": envchoice("SWITCHBOARD_LOG_LEVEL", LOG_LEVELS, "info").upper()},
    },
}

"""A stand-in for the Determined 0.38.1 master on loopback, built from the harness's own
generated REST bindings (`determined/common/api/bindings.py`).

The real master is a Go service that cannot run here. What the trial's harness and the SDK meet
is its REST API, and the Python side of that API is generated into bindings.py: one function per
endpoint (method, path template, request type, response type) and one class per message. This
module reads that file, so
  - a request is matched against the master's real routes; a request that matches none, or
    matches a route this stand-in has no handler for, is refused (404/501) and recorded in
    `refused`, and the test that owns the stand-in fails naming the method and path;
  - a request body is decoded with the endpoint's request class (`from_json`), after the two
    things grpc-gateway does before the master sees it: path parameters merged into the body,
    and protojson's acceptance of snake_case field names (`is_raw` for `isRaw`); a body that the
    class cannot decode is answered 400 and recorded, as a real master would refuse it;
  - every answer is an instance of the endpoint's response class, serialised with `to_json`; a
    streaming endpoint's handler answers a list of them, sent as grpc-gateway streams them: one
    `{"result": message}` JSON line each.
Every call is recorded in `calls` (method, path, binding name, decoded body) for assertions.
"""

import ast
import dataclasses
import json
import re
import threading
import urllib.parse
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

from determined.common.api import bindings


@dataclasses.dataclass(frozen=True)
class Route:
    name: str  # the binding function, e.g. post_ReportTrialMetrics
    method: str
    template: str  # e.g. /api/v1/trials/{metrics_trialId}/metrics
    pattern: "re.Pattern[str]"
    request_class: Optional[str]
    response_class: Optional[str]
    streaming: bool  # a server stream: the answer is one {"result": message} line per message


def _path_template(node: ast.expr) -> str:
    if isinstance(node, ast.Constant):
        return node.value
    assert isinstance(node, ast.JoinedStr), ast.dump(node)
    parts = []
    for value in node.values:
        if isinstance(value, ast.Constant):
            parts.append(value.value)
        else:
            parts.append("{" + ast.unparse(value.value) + "}")
    return "".join(parts)


def _annotation(arg: ast.arg) -> Optional[str]:
    """The request message class of a `body` argument (None for a free-form JSON body)."""
    name = (
        arg.annotation.value
        if isinstance(arg.annotation, ast.Constant)
        else ast.unparse(arg.annotation)
    )
    return name if hasattr(bindings, name) else None


def load_routes() -> List[Route]:
    """Every endpoint of bindings.py, most specific path first."""
    with open(bindings.__file__) as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # docstrings with "\d" in the generated file
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse(f.read())
    routes = []
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef) or not re.match(
            r"(get|post|put|patch|delete)_", fn.name
        ):
            continue
        request = next(
            (
                c
                for c in ast.walk(fn)
                if isinstance(c, ast.Call) and getattr(c.func, "attr", None) == "_do_request"
            ),
            None,
        )
        if request is None:
            continue
        kwargs = {k.arg: k.value for k in request.keywords}
        template = _path_template(kwargs["path"])
        body = next((a for a in fn.args.kwonlyargs if a.arg == "body"), None)
        response = next(
            (
                c.func.value.id
                for c in ast.walk(fn)
                if isinstance(c, ast.Call)
                and getattr(c.func, "attr", None) == "from_json"
                and isinstance(c.func.value, ast.Name)
            ),
            None,
        )
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
        routes.append(
            Route(
                name=fn.name,
                method=kwargs["method"].value,
                template=template,
                pattern=re.compile(regex + "$"),
                request_class=_annotation(body) if body is not None else None,
                response_class=response,
                streaming=any(
                    k.arg == "stream" and getattr(k.value, "value", False) is True
                    for k in request.keywords
                ),
            )
        )
    # Literal segments beat parameters (/trials/{id}/metrics before /trials/{a}/{b}).
    routes.sort(key=lambda r: (-r.template.count("/"), r.template.count("{")))
    return routes


ROUTES = load_routes()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _fields(message: str) -> Dict[str, str]:
    """A message class's fields and their annotations, from its generated __init__."""
    init = getattr(bindings, message).__init__
    return {k: str(v) for k, v in init.__annotations__.items() if k != "return"}


def message_json(message: str, value: Any) -> Any:
    """A JSON body as protojson reads it into `message`: field names in snake_case or
    lowerCamelCase, free-form maps (Struct fields such as metric dicts) left as they are, and an
    unknown field refused (ValueError), as the master's JSON decoder does."""
    if not isinstance(value, dict):
        raise ValueError(f"{message} must be a JSON object, got {value!r}")
    fields, out = _fields(message), {}
    for key, item in value.items():
        name = _camel(key)
        if name not in fields:
            raise ValueError(f"unknown field {key!r} in {message}")
        nested = re.findall(r"\b(v1\w+|trialv1\w+|checkpointv1\w+|experimentv1\w+)\b", fields[name])
        nested = [
            n
            for n in nested
            if hasattr(getattr(bindings, n, None), "__init__")
            and not isinstance(getattr(bindings, n), type(bindings.checkpointv1State))
        ]
        if nested and isinstance(item, dict):
            item = message_json(nested[0], item)
        elif nested and isinstance(item, list):
            item = [message_json(nested[0], i) if isinstance(i, dict) else i for i in item]
        out[name] = item
    return out


def merge_path_params(message: str, body: Dict[str, Any], params: Dict[str, str]) -> Dict[str, Any]:
    """grpc-gateway sets path parameters on the request message; `metrics_trialId` is the field
    metrics.trialId. Where the HTTP body is one field of the request (`body: "metadata"`), the
    path parameters are the request's other fields and stay out of the body. Numeric ids arrive
    as strings in the path."""
    fields = _fields(message)
    for name, raw in params.items():
        value: Any = int(raw) if raw.isdigit() else urllib.parse.unquote(raw)
        *parents, leaf = name.split("_")
        if (parents[0] if parents else leaf) not in fields:
            continue
        node = body
        for parent in parents:
            node = node.setdefault(parent, {})
        node.setdefault(leaf, value)
    return body


class MasterError(Exception):
    """An error the master itself answers with (not a stand-in failure): HTTP `status`."""

    status = 500


class NotFound(MasterError):
    """A handler's 404, as the master answers for something that does not exist (yet)."""

    status = 404


@dataclasses.dataclass
class Call:
    method: str
    path: str
    route: str
    params: Dict[str, str]
    query: Dict[str, str]
    body: Any  # the decoded request object, or None


class MasterStandIn:
    """The HTTP side: routing, decoding, recording. `handlers` has one method per binding name
    it answers (e.g. `post_ReportTrialMetrics(call) -> response object or None`), and may have
    `on_request(call)`, called with every recorded call before its handler."""

    def __init__(self, handlers: Any):
        self.handlers = handlers
        self.calls: List[Call] = []
        self.refused: List[str] = []
        self.lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the test output readable
                pass

            def _serve(self):
                status, payload = standin.dispatch(self.command, self.path, self._body())
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # A killed trial drops its connections; errors in handlers are answered 500 above.
        self.server.handle_error = lambda request, client_address: None
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "MasterStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def refuse(self, status: int, message: str) -> Tuple[int, Dict[str, Any]]:
        with self.lock:
            self.refused.append(message)
        return status, {"error": {"error": message}, "message": message, "code": status}

    def dispatch(self, method: str, raw_path: str, raw_body: bytes) -> Tuple[int, Any]:
        url = urllib.parse.urlsplit(raw_path)
        path = "/" + url.path.lstrip("/")
        query = dict(urllib.parse.parse_qsl(url.query))
        for route in ROUTES:
            match = route.pattern.match(path)
            if route.method == method and match:
                break
        else:
            return self.refuse(404, f"{method} {path}: no such route in Determined 0.38.1's API")
        handler = getattr(self.handlers, route.name, None)
        if handler is None:
            return self.refuse(
                501, f"{method} {path} ({route.name}): the stand-in does not answer it"
            )
        params = match.groupdict()
        body = None
        if route.request_class is not None:
            try:
                raw = merge_path_params(route.request_class, json.loads(raw_body or b"{}"), params)
                body = getattr(bindings, route.request_class).from_json(
                    message_json(route.request_class, raw)
                )
            except (ValueError, KeyError, TypeError) as e:
                return self.refuse(
                    400, f"{method} {path}: body does not decode as {route.request_class}: {e!r}"
                )
        query = {_camel(k): v for k, v in query.items()}
        call = Call(method, path, route.name, params, query, body)
        with self.lock:
            self.calls.append(call)
        try:
            if hasattr(self.handlers, "on_request"):
                self.handlers.on_request(call)
            response = handler(call)
        except MasterError as e:
            grpc_code = {404: 5, 500: 2}[e.status]  # NotFound, Unknown
            return e.status, {"error": {"error": str(e)}, "message": str(e), "code": grpc_code}
        except Exception as e:  # a stand-in bug must fail the test, not hang the harness
            return self.refuse(500, f"{method} {path} ({route.name}): handler failed: {e!r}")
        if route.response_class is None:
            return 200, {}
        expected = getattr(bindings, route.response_class)
        if route.streaming:
            assert all(isinstance(r, expected) for r in response), route.name
            lines = (json.dumps({"result": r.to_json(True)}) + "\n" for r in response)
            return 200, "".join(lines).encode()
        assert isinstance(response, expected), f"{route.name} must answer a {expected.__name__}"
        return 200, response.to_json(True)

    def called(self, name: str) -> List[Call]:
        with self.lock:
            return [c for c in self.calls if c.route == name]

    def endpoints(self) -> List[str]:
        """Each endpoint called, once, as 'METHOD template (binding)'."""
        by_name = {r.name: r for r in ROUTES}
        with self.lock:
            names = dict.fromkeys(c.route for c in self.calls)
        return [f"{by_name[n].method} {by_name[n].template} ({n})" for n in names]

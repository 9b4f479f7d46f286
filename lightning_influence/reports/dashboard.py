"""TensorBoard's INFLUENCE tab: a plugin, registered through the `tensorboard_plugins` entry point, that reads
every influence run under the log dir (see `logdir.py`) and serves a page of plain JavaScript (`static/`).

Routes, under `/data/plugin/influence/` (JSON unless said otherwise; a bad request gets a 4xx and
`{"error": message}`, never a traceback):

| route | answers |
| --- | --- |
| `index.js`, `style.css` | the page |
| `runs` | every run: name, state (complete, computing, unreadable), sizes, what was saved |
| `queries?run=` | every query: dataset index, label, prediction, loss, suspect mark |
| `query?run=&query=&k=` | a query's top-k helpful and harmful training examples and its score histogram |
| `train?run=&index=&k=` | a training example (dataset index): self-influence rank, the queries it helps and hurts |
| `self_influence?run=&k=` | the k highest self-influences |
| `export?run=&indices=` | CSV of the training examples with those dataset indices (the checked suspects) |
| `thumbnail?run=&split=&position=` | PNG thumbnail of a training or query example |
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import resources
from typing import Any

from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from lightning_influence.reports.examples import DASHBOARD_TOP, SELF_RANKING
from lightning_influence.reports.images import png
from lightning_influence.reports.logdir import InfluenceRun, RequestError, RunIndex, int_argument

PLUGIN_NAME = "influence"
_STATIC = {"/index.js": "text/javascript", "/style.css": "text/css"}
MAX_EXPORT = 100_000  # dataset indices in one export request
_log = logging.getLogger(__name__)

Handler = Callable[[wrappers.Request], Any]


def _static(name: str, content_type: str) -> Handler:
    def serve(request: wrappers.Request) -> wrappers.Response:
        body = resources.files(__package__).joinpath("static", name.lstrip("/")).read_bytes()
        return http_util.Respond(request, body, content_type)

    return serve


def _indices(value: str | None) -> list[int]:
    """A comma-separated list of dataset indices."""
    parts = [part for part in (value or "").split(",") if part.strip()]
    if not parts or len(parts) > MAX_EXPORT:
        raise RequestError(f"indices must be 1 to {MAX_EXPORT} comma-separated dataset indices, got {value!r}.")
    try:
        return [int(part) for part in parts]
    except ValueError:
        raise RequestError(f"indices must be integers separated by commas, got {value!r}.") from None


class InfluencePlugin(base_plugin.TBPlugin):
    """The INFLUENCE tab: queries with their most helpful and harmful training examples, training examples with
    the queries they affect, score histograms and the self-influence ranking with a CSV export."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        super().__init__(context)
        self._index = RunIndex(context.logdir)

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Influence")

    def is_active(self) -> bool:
        return bool(self._index.runs())

    def get_plugin_apps(self) -> dict[str, Any]:
        handlers: dict[str, Handler] = {route: _static(route, kind) for route, kind in _STATIC.items()}
        handlers.update({"/runs": self._runs, "/queries": self._queries, "/query": self._query, "/train": self._train,
                         "/self_influence": self._self_influence, "/export": self._export,
                         "/thumbnail": self._thumbnail})
        return {route: self._app(handler) for route, handler in handlers.items()}

    @staticmethod
    def _app(handler: Handler) -> Any:
        """A WSGI app answering with `handler`'s JSON (or response), a RequestError with its 4xx and message, and
        anything unexpected with a 500 and the error's message (logged with its traceback, never sent)."""
        @wrappers.Request.application
        def app(request: wrappers.Request) -> wrappers.Response:
            try:
                answer = handler(request)
            except RequestError as error:
                return http_util.Respond(request, {"error": str(error)}, "application/json", code=error.status)
            except Exception as error:
                _log.exception("influence dashboard: %s failed", request.path)
                return http_util.Respond(request, {"error": f"{type(error).__name__}: {error}"}, "application/json",
                                         code=500)
            if isinstance(answer, wrappers.Response):
                return answer
            return http_util.Respond(request, answer, "application/json")

        return app

    def _run(self, request: wrappers.Request) -> InfluenceRun:
        return self._index.get(request.args.get("run"))

    def _runs(self, request: wrappers.Request) -> list[dict[str, Any]]:
        return [run.info() for _, run in sorted(self._index.runs().items())]

    def _queries(self, request: wrappers.Request) -> list[dict[str, Any]]:
        return self._run(request).queries()

    def _query(self, request: wrappers.Request) -> dict[str, Any]:
        run = self._run(request)
        result, _ = run.load()
        query = int_argument(request.args.get("query"), "query", 0, result.num_queries)
        return run.query(query, int_argument(request.args.get("k", "10"), "k", 1, DASHBOARD_TOP + 1))

    def _train(self, request: wrappers.Request) -> dict[str, Any]:
        run = self._run(request)
        index = int_argument(request.args.get("index"), "index", 0, 2**63 - 1)
        return run.train(index, int_argument(request.args.get("k", "10"), "k", 1, DASHBOARD_TOP + 1))

    def _self_influence(self, request: wrappers.Request) -> list[dict[str, Any]]:
        k = int_argument(request.args.get("k", "50"), "k", 1, SELF_RANKING + 1)
        return self._run(request).self_influence(k)

    def _export(self, request: wrappers.Request) -> wrappers.Response:
        run = self._run(request)
        body = run.export(_indices(request.args.get("indices")))
        name = "".join(c if c.isalnum() else "_" for c in run.name)
        disposition = ("Content-Disposition", f'attachment; filename="suspected_mislabels_{name}.csv"')
        return http_util.Respond(request, body, "text/csv", headers=[disposition])

    def _thumbnail(self, request: wrappers.Request) -> wrappers.Response:
        run, name = self._run(request), request.args.get("split")
        split = run.split(name)
        position = int_argument(request.args.get("position"), "position", 0, len(split))
        image = split.thumbnail(position)
        if image is None:
            raise RequestError(f"No thumbnail was saved for {name} position {position} of run {run.name!r}.", 404)
        return http_util.Respond(request, png(image), "image/png", expires=3600)

"""The review page's web app: the page itself (`static/`, no external resources), the product
photos, and a JSON API the page calls; `create_review_app()` builds it.

Errors are JSON `{"detail": ...}` naming the row or field: a bad labels.csv is refused whole
(422, every bad row listed) and nothing of it is stored.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from prodsearch import __version__
from prodsearch.errors import ProdsearchError
from prodsearch.index import Index
from prodsearch.review.answers import AnswerName, AnswerStore
from prodsearch.review.report import chart_svg
from prodsearch.review.session import Progress, ReviewSession
from prodsearch.settings import Settings
from prodsearch.state import state_file

STATIC = Path(__file__).parent / "static"
#: the most pairs one queue request returns
MAX_BATCH = 50


# -- bodies -----------------------------------------------------------------------------------
class AnswerIn(BaseModel):
    """One answer to "are these the same product?"."""

    model_config = ConfigDict(extra="forbid")

    id_a: str = Field(min_length=1, description="A product id of the catalog.")
    id_b: str = Field(min_length=1, description="Another product id of the catalog.")
    answer: AnswerName


class SplitIn(BaseModel):
    """The member to split off a cluster."""

    model_config = ConfigDict(extra="forbid")

    member: str = Field(min_length=1)


class AnswerOut(BaseModel):
    """A stored answer."""

    id_a: str
    id_b: str
    answer: str
    source: str
    answered_at: str


class StoredOut(BaseModel):
    """What an action stored (or undid), and the progress after it."""

    stored: list[AnswerOut]
    status: dict[str, Any]


class ImportOut(BaseModel):
    """How many labels an import stored."""

    imported: int
    status: dict[str, Any]


def _out(answers: list[Any]) -> list[AnswerOut]:
    return [
        AnswerOut(
            id_a=a.id_a, id_b=a.id_b, answer=a.answer, source=a.source, answered_at=a.answered_at
        )
        for a in answers
    ]


# -- routes -----------------------------------------------------------------------------------
router = APIRouter()


def _session(request: Request) -> ReviewSession:
    return request.app.state.session


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    """The review page."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/images/{product_id}", include_in_schema=False)
def image(product_id: str, request: Request) -> FileResponse:
    """A product's photo: only the file its payload names (`image_path`) is served."""
    payload = _session(request).payloads.get(product_id) or {}
    path = Path(str(payload.get("image_path") or ""))
    if not payload.get("image_path") or not path.is_file():
        raise HTTPException(404, f"product {product_id!r} has no photo here")
    return FileResponse(path)


@router.get("/api/status")
def status(request: Request) -> dict[str, Any]:
    """Progress: answers by kind, candidate pairs, uncertain pairs still unanswered."""
    return _session(request).status()


@router.get("/api/queue")
def queue(
    request: Request, size: Annotated[int, Query(ge=1, le=MAX_BATCH)] = 10
) -> list[dict[str, Any]]:
    """The next pairs to answer: uncertain first, a product at most once, signals mixed."""
    return _session(request).queue(size)


@router.get("/api/pair")
def pair(request: Request, id_a: str, id_b: str) -> dict[str, Any]:
    """One candidate pair as the page shows it."""
    view = _session(request).pair(id_a, id_b)
    if view is None:
        raise HTTPException(404, f"{id_a} / {id_b} is not a candidate pair of this catalog")
    return view


@router.get("/api/answers")
def answers(request: Request) -> list[AnswerOut]:
    """Every pair's current answer, in the order given."""
    return _out(_session(request).answers.current())


@router.post("/api/answers")
def answer(body: AnswerIn, request: Request) -> StoredOut:
    """Store one answer at once."""
    session = _session(request)
    unknown = [i for i in (body.id_a, body.id_b) if i not in session.payloads]
    if unknown:
        raise HTTPException(422, f"unknown product id(s) {unknown} (not in the collection)")
    stored = session.answers.record([(body.id_a, body.id_b, body.answer)])
    return StoredOut(stored=_out(stored), status=session.status())


@router.post("/api/undo")
def undo(request: Request) -> StoredOut:
    """Take back the last action (one answer, one cluster confirmation or split, an import)."""
    session = _session(request)
    return StoredOut(stored=_out(session.answers.undo()), status=session.status())


@router.get("/api/labels.csv")
def export_labels(request: Request) -> Response:
    """The same/different answers as labels.csv (`id_a,id_b,same`); unsure ones stay out."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "labels.csv"
        _session(request).answers.export(path)
        text = path.read_text(encoding="utf-8")
    headers = {"Content-Disposition": 'attachment; filename="labels.csv"'}
    return Response(text, media_type="text/csv", headers=headers)


@router.post("/api/labels")
async def import_labels(file: Annotated[UploadFile, File()], request: Request) -> ImportOut:
    """Add the labels of an uploaded labels.csv, all or nothing (422 naming every bad row)."""
    session = _session(request)
    name = Path(file.filename or "labels.csv").name or "labels.csv"
    content = await file.read()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        imported = await run_in_threadpool(
            session.answers.import_labels, path, set(session.payloads)
        )
    return ImportOut(imported=imported, status=session.status())


@router.get("/api/clusters")
def clusters(request: Request) -> list[dict[str, Any]]:
    """The clusters of two or more products, largest first, with how much of each is reviewed."""
    return _session(request).clusters()


@router.get("/api/clusters/{number}")
def cluster(number: int, request: Request) -> dict[str, Any]:
    """One cluster's members (the representative first), photos and answers."""
    view = _session(request).cluster(number)
    if view is None:
        raise HTTPException(404, f"no cluster {number} of two or more products")
    return view


@router.post("/api/clusters/{number}/confirm")
def confirm(number: int, request: Request) -> StoredOut:
    """Every member is the representative's product ('same' against it)."""
    session = _session(request)
    if session.cluster(number) is None:
        raise HTTPException(404, f"no cluster {number} of two or more products")
    session.confirm_cluster(number)
    return StoredOut(stored=_out(_last_action(session)), status=session.status())


@router.post("/api/clusters/{number}/split")
def split(number: int, body: SplitIn, request: Request) -> StoredOut:
    """A member is not the others' product ('different' against each)."""
    session = _session(request)
    if not session.split_member(number, body.member):
        raise HTTPException(422, f"member: {body.member!r} is not in cluster {number}")
    return StoredOut(stored=_out(_last_action(session)), status=session.status())


class MergeIn(BaseModel):
    """An answer to a proposed merge of two stored clusters."""

    cluster_id: str
    other: str = Field(alias="with")
    merge: bool


@router.get("/api/proposed-merges")
def proposed_merges(request: Request) -> list[dict[str, Any]]:
    """Merges of stored clusters that assigning new products proposed, not decided yet."""
    return _session(request).proposed_merges()


@router.post("/api/proposed-merges")
def decide_merge(body: MergeIn, request: Request) -> dict[str, Any]:
    """Merge two stored clusters, or keep them apart; the answer is stored as a pair label."""
    session = _session(request)
    if not session.decide_merge(body.cluster_id, body.other, body.merge):
        raise HTTPException(404, f"no pending merge of {body.cluster_id} and {body.other}")
    return {"proposed_merges": session.proposed_merges(), "status": session.status()}


def _last_action(session: ReviewSession) -> list[Any]:
    current = session.answers.current()
    last = max((a.action for a in current), default=None)
    return [a for a in current if a.action == last]


@router.post("/api/calibrate")
async def calibrate(request: Request) -> dict[str, Any]:
    """Fit the calibration from the answers, apply it, and report (`error` says why not)."""
    return await run_in_threadpool(_session(request).calibrate)


@router.get("/api/report")
def report(request: Request) -> dict[str, Any]:
    """The latest calibration report."""
    found = _session(request).answers.last_report()
    if found is None:
        raise HTTPException(404, "not calibrated yet: answer some pairs, then Calibrate")
    return found


@router.get("/api/report.svg")
async def report_chart(request: Request) -> Response:
    """The latest report's chart (SVG)."""
    found = _session(request).answers.last_report()
    if found is None:
        raise HTTPException(404, "not calibrated yet: answer some pairs, then Calibrate")
    svg = await run_in_threadpool(chart_svg, found)
    return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-store"})


async def _project_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=422)


def create_review_app(
    settings: Settings | None = None,
    index: Index | None = None,
    write_settings: Path | None = None,
    progress: Progress | None = None,
) -> FastAPI:
    """Return the review app for the collection `settings` name (or `index`, which is shared
    and stays open after the app stops). At start-up it opens the answers file
    (`state.state_file`) and runs dedup; a calibration is written to `write_settings` when given."""
    settings = settings or (index.settings if index is not None else Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        opened = index or Index(settings=settings)
        answers = AnswerStore(state_file(settings, "review"))
        session = ReviewSession(opened, answers, write_settings, progress)
        try:
            await run_in_threadpool(session.refresh)
            app.state.session = session
            yield
        finally:
            answers.close()
            if index is None:
                opened.close()

    app = FastAPI(title="prodsearch review", version=__version__, lifespan=lifespan)
    app.add_exception_handler(ProdsearchError, _project_error)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app

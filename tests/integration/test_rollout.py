"""Rollouts (issue 25) on real servers over real models: mnist v1 and v2 trained with different
settings (they disagree on some digits), v3 trained on shuffled labels (conftest's
`rollout_models`). Shadow answers come from stable only while the agreement is measured, the
canary's share and stickiness, automatic rollback, bad policy files, copies shed under
overload, and reloads on SIGHUP and on a file change."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.overload_traffic import Workload, burst
from harness import ServerProcess, scrape
from serving.client import Client
from serving.core import rollout
from serving.core.rollout import Bounds, Policy
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.inference import grpc_predict_v2_pb2 as v2
from serving.pb.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from tests.helpers import cpu_session, expected_probabilities, metric, wait_for
from tests.integration.test_page import chromium, needs_chromium
from training import datasets

pytestmark = pytest.mark.slow

MODEL = "mnist"


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return datasets.load("mnist", allow_download=False).x_test[:400]


@pytest.fixture
def repo(rollout_models: Path, tmp_path: Path) -> Path:
    """This test's own copy of the three versions (policies are written into it)."""
    return shutil.copytree(rollout_models, tmp_path / "models")


def write(repo: Path, policy: Policy) -> None:
    rollout.write(repo / MODEL, policy)


def reload(proc: ServerProcess, state: str) -> None:
    """SIGHUP, then until the server reports `state`."""
    proc.signal(signal.SIGHUP)
    with Client(proc.target) as client:
        wait_for(f"rollout state {state}", lambda: client.rollout(MODEL).policy.state == state)


def settled(
    client: Client, what: str, ok: Callable[[pb.GetRolloutResponse], bool]
) -> pb.GetRolloutResponse:
    """The model's rollout, once `ok` holds for it (copies are compared after the answers)."""

    def probe() -> pb.GetRolloutResponse | None:
        r = client.rollout(MODEL)
        return r if ok(r) else None

    return wait_for(what, probe)


def answers(proc: ServerProcess, images: np.ndarray, **kw: object) -> list[int]:
    """The version that answered each image (one Predict call each)."""
    with Client(proc.target) as client:
        return [client.predict(MODEL, images[i : i + 1], **kw).version for i in range(len(images))]  # type: ignore[arg-type]


def test_shadow_answers_come_from_stable_while_agreement_is_measured(
    repo: Path, digits: np.ndarray
) -> None:
    write(repo, Policy(1, 2, rollout.SHADOW))
    x = digits[:200]
    v1 = expected_probabilities(cpu_session(repo / MODEL / "1" / "model.onnx"), x)
    v2_ = expected_probabilities(cpu_session(repo / MODEL / "2" / "model.onnx"), x)
    agreed = int((v1.argmax(1) == v2_.argmax(1)).sum())
    assert 0 < agreed < len(x), "the two models should disagree on some digits, not all"
    with ServerProcess(repo, http=True) as proc, Client(proc.target) as client:
        for i in range(len(x)):
            got = client.predict(MODEL, x[i : i + 1])
            assert got.version == 1
            assert got.probabilities is not None
            np.testing.assert_allclose(got.probabilities, v1[i : i + 1], atol=1e-5)
        r = settled(client, "200 compared", lambda r: r.compared == 200)
        assert (r.policy.state, r.policy.stable, r.policy.candidate) == ("shadow", 1, 2)
        assert r.agreed == agreed
        mean_abs = float(np.abs(v1 - v2_).mean(axis=1).mean())
        assert r.mean_abs_diff == pytest.approx(mean_abs, abs=1e-5)
        calls = {v.version: (v.role, v.calls, v.errors) for v in r.versions}
        assert calls == {1: ("stable", 200, 0), 2: ("candidate", 200, 0)}
        assert 0 < len(r.disagreements) <= 16
        d = r.disagreements[-1]
        assert d.stable.index != d.candidate.index and list(d.image.shape) == [28, 28, 1]
        # The same figures on /metrics, and over REST.
        pair = {"model": MODEL, "stable": "1", "candidate": "2"}
        assert metric(proc, "cnnserve_rollout_compared_images_total", **pair) == 200
        assert metric(proc, "cnnserve_rollout_agreed_images_total", **pair) == agreed
        assert metric(proc, "cnnserve_rollout_state", model=MODEL, state="shadow") == 1
        with urllib.request.urlopen(f"{proc.http_url}/v1/models/{MODEL}/rollout") as answer:
            body = json.load(answer)
        assert (body["compared"], body["agreed"]) == (200, agreed)
        assert body["disagreements"][-1]["image"]["shape"] == [28, 28, 1]
        # Roles in ListModels and metadata; the metadata of a call without a version is stable's.
        listed = {m.name: m for m in client.list_models().models}[MODEL]
        roles = {v.version: v.role for v in listed.versions}
        assert roles == {1: "stable", 2: "candidate", 3: ""}
        assert listed.default_version == 1 and listed.rollout.state == "shadow"
        md = client.metadata(MODEL)
        assert (md.version, md.role, md.rollout.candidate) == (1, "stable", 2)
        assert client.metadata(MODEL, 2).role == "candidate"


def test_canary_share_within_5_points_over_2000_calls(repo: Path, digits: np.ndarray) -> None:
    write(repo, Policy(1, 2, rollout.CANARY, 30.0))
    with ServerProcess(repo) as proc:
        counted = Counter(answers(proc, np.repeat(digits[:1], 2000, axis=0)))
        share = counted[2] / 2000
        assert abs(share - 0.30) <= 0.05, counted
        assert set(counted) == {1, 2}
        # Every candidate-answered call was copied to stable and compared (nothing loaded it).
        with Client(proc.target) as client:
            r = settled(client, "the copies compared", lambda r: r.compared == counted[2])
        assert {v.version: v.calls for v in r.versions}[1] == 2000  # its own + the copies


def client_png(pixels: np.ndarray) -> bytes:
    from io import BytesIO

    from PIL import Image

    out = BytesIO()
    Image.fromarray(pixels[..., 0]).save(out, format="PNG")
    return out.getvalue()


def test_canary_is_sticky_per_client_key_on_every_protocol(repo: Path, digits: np.ndarray) -> None:
    write(repo, Policy(1, 2, rollout.CANARY, 50.0))
    with ServerProcess(repo, http=True) as proc, Client(proc.target) as client:
        sides = {}
        for k in range(40):
            key = f"client-{k}"
            seen = {client.predict(MODEL, digits[:1], client_key=key).version for _ in range(5)}
            assert len(seen) == 1, (key, seen)
            sides[key] = seen.pop()
        assert set(sides.values()) == {1, 2}, sides  # 40 keys at 50 %: both sides have some
        # The Open Inference Protocol takes the key as a request parameter: the same side.
        with proc.channel() as channel:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            for key in list(sides)[:10]:
                request = v2.ModelInferRequest(model_name=MODEL)
                request.parameters["client_key"].string_param = key
                request.inputs.add(name="image", datatype="UINT8", shape=[1, 28, 28, 1])
                request.raw_input_contents.append(digits[:1].tobytes())
                assert int(stub.ModelInfer(request).model_version) == sides[key]
        # REST: the inference request's parameter, and classify's query.
        for key in list(sides)[:10]:
            body = {
                "parameters": {"client_key": key},
                "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28, 1],
                            "data": digits[0].ravel().tolist()}],
            }  # fmt: skip
            url = f"{proc.http_url}/v2/models/{MODEL}/infer"
            request_ = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
            with urllib.request.urlopen(request_) as answer:
                assert int(json.load(answer)["model_version"]) == sides[key]
            url = f"{proc.http_url}/v1/models/{MODEL}/classify?client_key={key}"
            png = client_png(digits[0])
            with urllib.request.urlopen(urllib.request.Request(url, png, method="POST")) as answer:
                assert json.load(answer)["version"] == sides[key]


def test_a_call_naming_a_version_bypasses_the_policy(repo: Path, digits: np.ndarray) -> None:
    write(repo, Policy(1, 2, rollout.CANARY, 100.0))
    with ServerProcess(repo) as proc, Client(proc.target) as client:
        assert set(answers(proc, digits[:20])) == {2}
        assert set(answers(proc, digits[:20], version=1)) == {1}
        assert set(answers(proc, digits[:20], version=3)) == {3}
        r = settled(client, "20 compared", lambda r: r.compared == 20)
        assert {v.version: v.calls for v in r.versions} == {1: 20, 2: 20}


@pytest.mark.parametrize("mode", [rollout.SHADOW, rollout.CANARY])
def test_a_worse_candidate_is_rolled_back_automatically(
    repo: Path, digits: np.ndarray, mode: str
) -> None:
    """v3 learned shuffled labels: its agreement with v1 falls under the bound after 60
    compared digits, and the server stops sending it anything."""
    bounds = Bounds(after=60, min_agreement=0.6)
    write(repo, Policy(1, 3, mode, 50.0, bounds))
    with ServerProcess(repo) as proc, Client(proc.target) as client:
        for i in range(300):
            client.predict(MODEL, digits[i : i + 1])
            if client.rollout(MODEL).policy.state == "rolled_back":
                break
        r = settled(client, "rolled back", lambda r: r.policy.state == "rolled_back")
        assert r.agreement < 0.6 and r.compared >= 60, r
        assert "under the bound of 60.0%" in r.policy.reason
        assert "rolled back automatically" in proc.logs()
        assert (
            metric(proc, "cnnserve_rollout_rollbacks_total", model=MODEL, bound="min_agreement")
            == 1
        )
        assert (
            metric(proc, "cnnserve_rollout_role", model=MODEL, version="3", role="rolled_back") == 1
        )
        compared = r.compared
        assert set(answers(proc, digits[:100])) == {1}  # no traffic to v3 any more
        assert client.rollout(MODEL).compared == compared  # and no copies
        roles = {v.version: v.role for v in client.list_models().models[0].versions}
        assert roles[3] == "rolled_back"


def test_a_bad_policy_file_is_refused_and_the_last_good_one_stays(
    repo: Path, digits: np.ndarray
) -> None:
    write(repo, Policy(1, 2, rollout.SHADOW))
    path = repo / MODEL / rollout.POLICY_FILE
    with ServerProcess(repo) as proc, Client(proc.target) as client:
        bad = {
            "stable: 1\ncandidate: 9\nmode: shadow\n": "candidate: unknown version 9",
            "stable: 1\ncandidate: 2\nmode: canary\ncanary_percent: 150\n": "canary_percent: 150",
            "stable: [1\n": "not valid YAML",
            "stable: 1\nmode: sideways\n": "mode: 'sideways'",
        }
        for text, problem in bad.items():
            path.write_text(text)
            proc.signal(signal.SIGHUP)
            wait_for(problem, lambda p=problem: p in proc.logs())  # type: ignore[misc]
            line = next(x for x in proc.logs().splitlines() if problem in x)
            assert str(path) in line and "last good policy stays" in line, line
            r = client.rollout(MODEL)
            assert (r.policy.state, r.policy.stable, r.policy.candidate) == ("shadow", 1, 2)
            assert problem in r.policy.file_error
            assert set(answers(proc, digits[:5])) == {1}
        write(repo, Policy(2))  # a good file again: it takes effect, the error goes
        reload(proc, "stable")
        r = client.rollout(MODEL)
        assert (r.policy.stable, r.policy.file_error) == (2, "")
        assert set(answers(proc, digits[:5])) == {2}


def test_sighup_and_file_changes_reload_the_policy(repo: Path, digits: np.ndarray) -> None:
    # No file: the newest version answers, as before rollouts existed.
    with ServerProcess(repo) as proc, Client(proc.target) as client:
        assert set(answers(proc, digits[:5])) == {3}
        assert client.rollout(MODEL).policy.state == "none"
        write(repo, Policy(1, 2, rollout.SHADOW))
        reload(proc, "shadow")
        assert set(answers(proc, digits[:5])) == {1}
        (repo / MODEL / rollout.POLICY_FILE).unlink()
        reload(proc, "none")
        assert set(answers(proc, digits[:5])) == {3}
    # Polling: a change of the file is picked up without a signal.
    with ServerProcess(repo, ["--poll-seconds", "0.2"]) as proc, Client(proc.target) as client:
        write(repo, Policy(2))
        wait_for("v2 answers", lambda: client.predict(MODEL, digits[:1]).version == 2)
        write(repo, Policy(1, 2, rollout.CANARY, 100.0))
        wait_for("canary", lambda: client.rollout(MODEL).policy.state == "canary")
        assert set(answers(proc, digits[:5])) == {2}


def test_a_pinned_version_stays_loaded_outside_max_versions(repo: Path) -> None:
    """--max-versions 1 keeps the newest (v3) and whatever the policy names."""
    write(repo, Policy(1, 2, rollout.SHADOW))
    with ServerProcess(repo, ["--max-versions", "1"]) as proc, Client(proc.target) as client:
        states = {v.version: v.state for v in client.list_models().models[0].versions}
        assert states == {1: "READY", 2: "READY", 3: "READY"}
        write(repo, Policy(1))
        reload(proc, "stable")
        wait_for(
            "v2 unloaded",
            lambda: (
                {v.version: v.state for v in client.list_models().models[0].versions}[2]
                == "UNLOADED"
            ),
        )


def test_copies_are_shed_under_overload_and_no_real_call_is_lost(repo: Path) -> None:
    """300 Predict calls of 32 images at once, with a shadow candidate: every call answered OK
    by stable (its answers, not the candidate's), none refused; copies were dropped."""
    write(repo, Policy(1, 2, rollout.SHADOW))
    work = Workload.build(MODEL, repo / MODEL / "1" / "model.onnx", 32)
    with ServerProcess(repo) as proc:
        result = asyncio.run(burst(proc.target, work, calls=300, channels=8, deadline_s=120))
        assert result.codes == {"OK": 300}, result
        assert result.wrong_answers == 0
        found = scrape(proc.metrics_port)
        assert found.total("cnnserve_rollout_shed_total", model=MODEL) > 0
        assert found.total("cnnserve_rejected_total") == 0
        ok = found.total("cnnserve_rollout_calls_total", model=MODEL, role="stable", outcome="ok")
        assert ok == 300
        with Client(proc.target) as client:
            r = client.rollout(MODEL)
        assert r.shed > 0 and r.shed + r.compared // 32 <= 300


def test_the_cli_writes_promotes_and_rolls_back(repo: Path) -> None:
    from serving.client.cli import _cli

    folder = repo / MODEL
    assert _cli(["rollout", "set", MODEL, "--models-dir", str(repo), "--stable", "1",
                 "--candidate", "2", "--mode", "canary", "--canary-percent", "10",
                 "--min-agreement", "0.9"]) == 0  # fmt: skip
    policy = rollout.read(folder)
    assert policy == Policy(1, 2, "canary", 10.0, Bounds(min_agreement=0.9))
    assert _cli(["rollout", "set", MODEL, "--models-dir", str(repo), "--stable", "7"]) == 1
    assert rollout.read(folder) == policy  # a refused policy is never written
    assert _cli(["rollout", "promote", MODEL, "--models-dir", str(repo)]) == 0
    assert rollout.read(folder) == Policy(2)
    assert _cli(["rollout", "rollback", MODEL, "--models-dir", str(repo)]) == 1  # no candidate
    write(repo, Policy(2, 3, rollout.SHADOW))
    assert _cli(["rollout", "rollback", MODEL, "--models-dir", str(repo)]) == 0
    assert rollout.read(folder) == Policy(2)
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temp files


def test_the_cli_shows_the_status_and_draws_the_disagreements(
    repo: Path, digits: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from serving.client.cli import _cli

    write(repo, Policy(1, 2, rollout.SHADOW))
    with ServerProcess(repo) as proc, Client(proc.target) as client:
        answers(proc, digits[:100])
        wait_for("100 compared", lambda: client.rollout(MODEL).compared == 100)
        out = tmp_path / "disagreements.png"
        assert _cli(["--target", proc.target, "rollout", "status", MODEL, "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "mnist: shadow (stable v1, candidate v2, shadow)" in printed
        assert "compared 100 images: top-1 agreement" in printed
        assert "latest disagreements" in printed
        assert Image.open(out).size[0] > 100
        assert _cli(["--target", proc.target, "list"]) == 0
        assert "rollout shadow" in capsys.readouterr().out


def test_an_unknown_model_has_no_rollout(repo: Path) -> None:
    with ServerProcess(repo) as proc, Client(proc.target) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.rollout("nope")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@needs_chromium
def test_the_page_shows_the_rollout_and_its_disagreements(repo: Path, digits: np.ndarray) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    write(repo, Policy(1, 2, rollout.SHADOW))
    with ServerProcess(repo, http=True) as proc, Client(proc.target) as client:
        answers(proc, digits[:100])
        r = settled(client, "100 compared", lambda r: r.compared == 100)
        with chromium() as driver:
            wait = WebDriverWait(driver, 60)
            driver.get(f"{proc.http_url}/?model={MODEL}")
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
            cells = driver.find_elements(By.CSS_SELECTOR, "#disagreements .disagreement")
            assert len(cells) == len(r.disagreements) > 0
            d = r.disagreements[0]
            assert cells[0].text.splitlines() == [
                f"v1: {d.stable.label}",
                f"v2: {d.candidate.label}",
            ]
            state = driver.find_element(By.ID, "rollout-state").text
            assert state == "shadow: stable v1, candidate v2 (shadow)"
            figures = driver.find_element(By.ID, "rollout-figures").text
            assert f"top-1 agreement {100 * r.agreement:.1f}%" in figures
            assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []

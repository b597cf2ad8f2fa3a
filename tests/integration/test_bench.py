"""`make bench` in miniature: the tooling runs end to end and its correctness check bites.

Figures are not checked (benchmarks only, no timed assertions): the smoke run measures nothing.
The streaming rows need perf_analyzer, which bench/perf_analyzer.sh sets up once (a download);
where it cannot be set up they are left out and the rest is still checked.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import echo_server, loadgen, serving_bench
from bench.loadgen import BenchError, RestAnswer, setup_perf_analyzer, start_echo
from bench.measure import Runner
from harness import PYTHON, ROOT, free_port, write_tiny_model
from harness.process import cpu_times, stolen_share
from serving.pb.inference import grpc_predict_v2_pb2 as v2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def h2load() -> str:
    path = shutil.which("h2load")
    if path is None:
        pytest.skip("h2load is not installed (apt-get install nghttp2-client; CI installs it)")
    return path


@pytest.fixture(scope="module")
def perf_analyzer() -> bool:
    found, _ = setup_perf_analyzer()
    return found is not None


def test_bench_smoke_writes_csv_table_and_plot(
    h2load: str, perf_analyzer: bool, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    write_tiny_model(models / "tiny" / "1" / "model.onnx")
    out = tmp_path / "out"
    done = subprocess.run(
        [
            PYTHON,
            "bench/serving_bench.py",
            "--smoke",
            "--no-triton",
            "--models",
            str(models),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    points = {(r["target"], int(r["batch"]), int(r["concurrency"])) for r in rows}
    for api in ("cnnserve", "v2", "echo"):
        assert {(api, 1, 1), (api, 1, 4), (api, 32, 1)} <= points, points
    assert {("in-process", 1, 1), ("in-process x2", 1, 2), ("in-process", 32, 1)} <= points
    assert ("in-process 1t", 1, 1) in points
    # REST (h2load --h1) at the gRPC rows' points, binary tensors; JSON tensors at batch 1
    for target in ("rest", "echo http"):
        assert {(target, 1, 1), (target, 1, 4), (target, 32, 1)} <= points, points
    assert {("rest json", 1, 1), ("echo http json", 1, 4)} <= points, points
    rest = [r for r in rows if r["target"] in ("rest", "rest json")]
    assert all(r["loadgen"] == "h2load --h1" for r in rest)
    # plausible: served, and a ratio to gRPC, the HTTP echo floor and ONNX Runtime
    assert all(0 < float(r["vs_grpc"]) < 100 for r in rest), rest
    assert all(0 < float(r["vs_echo"]) < 100 and float(r["vs_in_process"]) > 0 for r in rest)
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    served = [
        r
        for r in rows
        if r["target"] in ("cnnserve", "v2", "v2 pa", "v2 stream", "rest", "rest json")
    ]
    assert all(float(r["server_cpu_us_per_image"]) > 0 for r in served)
    assert all(r["vs_in_process"] != "nan" and r["vs_echo"] != "nan" for r in served)
    if perf_analyzer:  # one streaming point (4 streams), against unary and the echo floor
        pa = {r["target"]: r for r in rows if r["loadgen"] == "perf_analyzer"}
        assert set(pa) == {"v2 pa", "v2 stream", "echo pa", "echo stream"}, set(pa)
        assert all(int(r["batch"]) == 1 and int(r["concurrency"]) == 4 for r in pa.values())
        assert float(pa["v2 stream"]["streams"]) == 4  # the server's gauge: one per thread
        assert float(pa["echo stream"]["streams"]) == 4
        assert float(pa["v2 stream"]["vs_unary"]) > 0
        assert all(float(r["loadgen_cpu_us_per_request"]) > 0 for r in pa.values())
    report = (out / "report.md").read_text()
    assert "| target | load gen. | batch |" in report and "## Targets" in report
    assert "start-up to SERVING" in report and "VmRSS" in report
    assert "CPU time stolen by the hypervisor during the run: " in report
    assert "## REST (KServe v2 over HTTP/1.1)" in report and "| rest | h2load --h1 | 1 |" in report
    assert (out / "report.png").stat().st_size > 10_000


def test_publish_refuses_a_run_the_hypervisor_took_too_much_of(tmp_path: Path) -> None:
    out, dest = tmp_path / "results", tmp_path / "bench"
    out.mkdir()
    dest.mkdir()
    (out / "report.md").write_text("# run 6")
    (out / "report.png").write_bytes(b"png")
    (dest / "REPORT.md").write_text("# run 5")
    published, said = serving_bench.publish(out, dest, stolen=0.213, max_steal=0.05)
    assert not published and said.startswith("not published: 21.3% ") and "5.0%" in said
    assert (dest / "REPORT.md").read_text() == "# run 5" and not (dest / "report.png").exists()
    published, said = serving_bench.publish(out, dest, stolen=0.031, max_steal=0.05)
    assert published and (dest / "REPORT.md").read_text() == "# run 6"
    assert (dest / "report.png").read_bytes() == b"png"


def test_stolen_share_is_steal_over_all_cpu_time() -> None:
    before = [100, 0, 50, 800, 0, 0, 10, 40]
    after = [200, 0, 100, 900, 0, 0, 20, 120]  # 340 ticks, 80 of them stolen
    assert stolen_share(before, after) == pytest.approx(80 / 340)
    assert stolen_share(before, before) == 0.0
    assert len(cpu_times()) == 8


def test_echo_copies_the_request_id_into_each_stream_answer() -> None:
    answer = v2.ModelStreamInferResponse()
    answer.infer_response.model_name = "m"
    answer.infer_response.id = "from-the-real-server"
    answer.infer_response.raw_output_contents.append(b"\x00" * 40)
    build = echo_server.with_id(answer.SerializeToString(), (2, 3))
    request = v2.ModelInferRequest(model_name="m", id="17")
    request.raw_input_contents.append(b"\x01" * 3136)
    ident = echo_server.find_bytes(request.SerializeToString(), 3)
    assert ident == b"17"
    echoed = v2.ModelStreamInferResponse.FromString(build(ident))
    answer.infer_response.id = "17"
    assert echoed == answer
    assert not v2.ModelStreamInferResponse.FromString(build(b"")).infer_response.id


def test_bench_fails_when_the_server_did_not_answer_every_request_ok() -> None:
    url = "http://127.0.0.1:1/cnnserve.v1.CnnServe/Predict"
    Runner._check({("requests", "Predict", "OK", "grpc"): 100.0}, url, 100)  # all answered OK
    with pytest.raises(BenchError, match="sent 100 requests, the server counted 99"):
        Runner._check({("requests", "Predict", "OK", "grpc"): 99.0}, url, 100)
    with pytest.raises(BenchError, match="INVALID_ARGUMENT"):
        Runner._check(
            {
                ("requests", "Predict", "OK", "grpc"): 100.0,
                ("requests", "Predict", "INVALID_ARGUMENT", "grpc"): 3.0,
            },
            url,
            100,
        )
    # REST: counted under protocol="http"; the same method over gRPC does not count
    rest = "http://127.0.0.1:1/v2/models/tiny/infer"
    Runner._check({("requests", "ModelInfer", "OK", "http"): 50.0}, rest, 50)
    with pytest.raises(BenchError, match="counted 0 ModelInfer OK over http"):
        Runner._check({("requests", "ModelInfer", "OK", "grpc"): 50.0}, rest, 50)
    with pytest.raises(BenchError, match="INVALID_ARGUMENT"):
        Runner._check(
            {
                ("requests", "ModelInfer", "OK", "http"): 50.0,
                ("requests", "ModelInfer", "INVALID_ARGUMENT", "http"): 1.0,
            },
            rest,
            50,
        )
    # perf_analyzer: it sends more than it measures; any code but OK fails the run
    assert Runner._check_served({("requests", "ModelStreamInfer", "OK", "grpc"): 120.0},
                                "ModelStreamInfer", 100, "v2 stream") == 120  # fmt: skip
    with pytest.raises(BenchError, match="measured 100 answers, the server counted 90"):
        Runner._check_served(
            {("requests", "ModelStreamInfer", "OK", "grpc"): 90.0},
            "ModelStreamInfer",
            100,
            "v2 stream",
        )
    with pytest.raises(BenchError, match="UNAVAILABLE"):
        Runner._check_served(
            {
                ("requests", "ModelStreamInfer", "OK", "grpc"): 120.0,
                ("requests", "ModelStreamInfer", "UNAVAILABLE", "grpc"): 1.0,
            },
            "ModelStreamInfer",
            100,
            "v2 stream",
        )


def test_bench_fails_when_a_rest_answer_is_not_the_one_checked(h2load: str, tmp_path: Path) -> None:
    """h2load --h1 against the echo server's HTTP route: answers of the checked size pass; a
    body of another size, or a status other than 200, fails the run."""
    answer = b'{"model_name":"tiny","outputs":[]}'
    http_port = free_port()
    echo, _ = start_echo(
        tmp_path, "t", http={"/json/infer": RestAnswer(answer, None)}, http_port=http_port
    )
    payload = tmp_path / "body.json"
    payload.write_bytes(b'{"inputs":[]}')
    url = f"http://127.0.0.1:{http_port}/json/infer"
    headers = ("content-type: application/json",)
    try:
        result, _ = loadgen.h2load(url, payload, 20, 2, tmp_path / "ok.log", headers=headers,
                               h1=True, answer_bytes=len(answer))  # fmt: skip
        assert result.succeeded == 20
        with pytest.raises(BenchError, match="bytes of bodies came"):
            loadgen.h2load(url, payload, 20, 2, tmp_path / "size.log", headers=headers, h1=True,
                       answer_bytes=len(answer) + 1)  # fmt: skip
        with pytest.raises(BenchError, match="0 of 20 requests got HTTP 200"):
            loadgen.h2load(url.replace("json", "nope"), payload, 20, 2, tmp_path / "404.log",
                       headers=headers, h1=True, answer_bytes=len(answer))  # fmt: skip
    finally:
        echo.stop()

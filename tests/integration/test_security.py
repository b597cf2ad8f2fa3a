"""TLS, mutual TLS and bearer tokens on the real server, with throwaway certificates made at run
time (the `cryptography` package); the config checks; no unpickling or eval in `serving`."""

from __future__ import annotations

import ast
import datetime
import http.client
import ipaddress
import json
import os
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from harness import PYTHON, ROOT, ServerProcess, scrape
from serving import config
from serving.client import Client
from serving.core import images
from serving.errors import InvalidArgument
from serving.pb.inference import grpc_predict_v2_pb2 as v2
from serving.pb.inference import grpc_predict_v2_pb2_grpc as v2_grpc

pytestmark = pytest.mark.slow

X = np.zeros((2, 28, 28, 1), np.uint8)
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
TOKEN = "s3cr3t-token-of-the-test"


# ------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path  # another CA, and a client certificate it signed
    rogue_cert: Path
    rogue_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(
    folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("ca", "srv", "cli", "rca", "rcli")}
    ca = _issue("cnnserve test CA", keys["ca"], None, ca=True)
    rogue = _issue("rogue CA", keys["rca"], None, ca=True)
    ca_path, _ = _write(folder, "ca", ca, keys["ca"])
    rogue_path, _ = _write(folder, "rogue-ca", rogue, keys["rca"])
    server = _issue("localhost", keys["srv"], (ca.subject, keys["ca"]), server=True)
    client = _issue("client", keys["cli"], (ca.subject, keys["ca"]))
    rogue_client = _issue("intruder", keys["rcli"], (rogue.subject, keys["rca"]))
    return Pki(
        ca_path,
        *_write(folder, "server", server, keys["srv"]),
        *_write(folder, "client", client, keys["cli"]),
        rogue_path,
        *_write(folder, "rogue-client", rogue_client, keys["rcli"]),
    )


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[attr-defined,no-any-return]


def predict_code(client: Client) -> grpc.StatusCode:
    with client:
        return code_of(lambda: client.predict("fashion", X))


# ------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def tls_server(trained_repo: Path, pki: Pki) -> Iterator[ServerProcess]:
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    with ServerProcess(trained_repo, args, credentials=creds, http=True) as proc:
        yield proc


def https_get(url: str, ca: Path | None, cert: tuple[Path, Path] | None = None) -> int:
    """The status of a GET over HTTPS, trusting only `ca` (None: the system's roots)."""
    context = ssl.create_default_context(cafile=None if ca is None else str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


def test_rest_speaks_tls_with_the_same_certificate(tls_server: ServerProcess, pki: Pki) -> None:
    url = f"{tls_server.http_url}/v2/models/fashion/ready"
    assert url.startswith("https://")
    assert https_get(url, pki.ca) == 200
    for untrusted in (None, pki.rogue_ca):
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            https_get(url, untrusted)
    # Plain HTTP against the TLS port gets no answer.
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        urllib.request.urlopen(url.replace("https://", "http://"), timeout=10)


def test_tls_client_with_the_ca_gets_answers(tls_server: ServerProcess, pki: Pki) -> None:
    with Client(tls_server.target, root_certificates=pki.ca, timeout=30) as client:
        result = client.predict("fashion", X)
        assert result.version == 1 and len(result.indices) == 2
        assert client.health() == "SERVING"
    assert "(gRPC, TLS, token auth off)" in tls_server.logs()


def test_large_https_bodies_on_one_connection(tls_server: ServerProcess, pki: Pki) -> None:
    """Requests of hundreds of KiB, one after the other on a kept-alive HTTPS connection (the
    server reads a handshake into a small buffer, then the bodies into a larger one), answer
    what gRPC over TLS answers."""
    images = np.random.default_rng(3).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    with Client(tls_server.target, root_certificates=pki.ca, timeout=30) as client:
        expected = client.predict("fashion", images).probabilities
    assert expected is not None
    context = ssl.create_default_context(cafile=str(pki.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", tls_server.http_port, context=context)
    try:
        conn.request("GET", "/v2/models/fashion")
        metadata = json.loads(conn.getresponse().read())
        name = metadata["inputs"][0]["name"]
        for batch in (64, 1, 64):
            x = images[:batch]
            tensor = {"name": name, "datatype": "UINT8", "shape": list(x.shape)}
            body = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
            assert len(body) > 100_000 or batch == 1
            conn.request(
                "POST", "/v2/models/fashion/infer", body, {"Content-Type": "application/json"}
            )
            response = conn.getresponse()
            answer = response.read()
            assert response.status == 200, answer
            out = json.loads(answer)["outputs"][0]
            got = np.asarray(out["data"], np.float32).reshape(out["shape"])
            np.testing.assert_allclose(got, expected[:batch], atol=1e-5)
    finally:
        conn.close()


def test_tls_refuses_clients_that_do_not_trust_it(tls_server: ServerProcess, pki: Pki) -> None:
    # The system's roots do not know our throwaway CA; another CA does not sign the server.
    for client in (
        Client(tls_server.target, tls=True, timeout=10),
        Client(tls_server.target, root_certificates=pki.rogue_ca, timeout=10),
        Client(tls_server.target, timeout=10),  # plaintext against the TLS port
    ):
        assert predict_code(client) == grpc.StatusCode.UNAVAILABLE


def test_client_cli_speaks_tls(tls_server: ServerProcess, pki: Pki) -> None:
    base = [PYTHON, "-m", "serving.client", "--target", tls_server.target]
    ok = subprocess.run(
        [*base, "--ca-cert", str(pki.ca), "list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("fashion: default v1")
    plain = subprocess.run(
        [*base, "--timeout", "10", "list"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert plain.returncode == 1 and plain.stderr.startswith("error: UNAVAILABLE"), plain.stderr


# ------------------------------------------------------------------ mutual TLS + token from the environment


@pytest.fixture(scope="module")
def mtls_server(trained_repo: Path, pki: Pki) -> Iterator[ServerProcess]:
    args = [
        "--tls-cert", str(pki.server_cert),
        "--tls-key", str(pki.server_key),
        "--tls-client-ca", str(pki.ca),
    ]  # fmt: skip
    creds = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    env = {"CNNSERVE_AUTH_TOKEN": TOKEN}
    with ServerProcess(trained_repo, args, env=env, credentials=creds, http=True) as proc:
        yield proc


def test_rest_needs_the_client_certificate_too(mtls_server: ServerProcess, pki: Pki) -> None:
    ready = f"{mtls_server.http_url}/v2/health/ready"  # open to probes: no token needed
    assert https_get(ready, pki.ca, (pki.client_cert, pki.client_key)) == 200
    for cert in (None, (pki.rogue_cert, pki.rogue_key)):
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            https_get(ready, pki.ca, cert)
    # With the certificate, the token is still required for everything but health.
    models = f"{mtls_server.http_url}/v2/models/fashion"
    assert https_get(models, pki.ca, (pki.client_cert, pki.client_key)) == 401


def test_mtls_needs_a_client_certificate_the_ca_signed(
    mtls_server: ServerProcess, pki: Pki
) -> None:
    target = mtls_server.target
    with Client(
        target,
        root_certificates=pki.ca,
        client_cert=pki.client_cert,
        client_key=pki.client_key,
        token=TOKEN,
    ) as client:
        assert client.predict("fashion", X).version == 1
    for refused in (
        Client(target, root_certificates=pki.ca, token=TOKEN, timeout=10),  # no client cert
        Client(
            target,
            root_certificates=pki.ca,
            client_cert=pki.rogue_cert,
            client_key=pki.rogue_key,
            token=TOKEN,
            timeout=10,
        ),  # a certificate from another CA
    ):
        assert predict_code(refused) == grpc.StatusCode.UNAVAILABLE
    assert "(gRPC, mutual TLS, token auth on)" in mtls_server.logs()


def test_mtls_and_token_are_both_required(mtls_server: ServerProcess, pki: Pki) -> None:
    """CNNSERVE_AUTH_TOKEN holds the token itself; a good certificate alone is not enough."""
    with Client(
        mtls_server.target,
        root_certificates=pki.ca,
        client_cert=pki.client_cert,
        client_key=pki.client_key,
        timeout=10,
    ) as client:
        assert code_of(client.list_models) == UNAUTHENTICATED
        assert client.health() == "SERVING"  # probes need no token


# ------------------------------------------------------------------ token auth


@pytest.fixture(scope="module")
def token_server(
    trained_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    with ServerProcess(trained_repo, ["--auth-token-file", str(token_file)]) as proc:
        yield proc


def _v2_ready(
    channel: grpc.Channel, metadata: list[tuple[str, str]] | None
) -> v2.ServerReadyResponse:
    response: v2.ServerReadyResponse = v2_grpc.GRPCInferenceServiceStub(channel).ServerReady(
        v2.ServerReadyRequest(), timeout=10, metadata=metadata
    )
    return response


def test_token_auth_on_both_apis(token_server: ServerProcess) -> None:
    target = token_server.target
    with Client(target, token=TOKEN) as client:
        assert client.predict("fashion", X).version == 1
    for token in (None, "wrong", TOKEN + "x", TOKEN[:-1], ""):
        assert predict_code(Client(target, token=token, timeout=10)) == UNAUTHENTICATED
        with Client(target, token=token, timeout=10) as client:
            assert code_of(client.list_models) == UNAUTHENTICATED
    with grpc.insecure_channel(target) as channel:
        assert _v2_ready(channel, [("authorization", f"Bearer {TOKEN}")]).ready
        assert _v2_ready(channel, [("authorization", f"bearer {TOKEN}")]).ready  # scheme: any case
        for metadata in (
            None,
            [("authorization", TOKEN)],  # no scheme
            [("authorization", f"Basic {TOKEN}")],
            [("authorization", "Bearer wrong")],
        ):
            with pytest.raises(grpc.RpcError) as info:
                _v2_ready(channel, metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        # unknown methods are refused before anything else is said about them
        nope = channel.unary_unary("/cnnserve.v1.CnnServe/Nope", None, None)
        assert code_of(lambda: nope(b"", timeout=10)) == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_stay_open(token_server: ServerProcess) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(token_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fashion"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert "cnnserve.v1.CnnServe" in services


def test_refused_calls_are_counted(token_server: ServerProcess) -> None:
    with Client(token_server.target, token="wrong", timeout=10) as client:
        for _ in range(3):
            assert code_of(lambda: client.metadata("fashion")) == UNAUTHENTICATED
    refused = scrape(token_server.metrics_port).total(
        "cnnserve_requests_total", method="GetModelMetadata", code="UNAUTHENTICATED"
    )
    assert refused >= 3, refused


def test_client_cli_sends_the_token(token_server: ServerProcess, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    base = [PYTHON, "-m", "serving.client", "--target", token_server.target]
    env = {k: v for k, v in os.environ.items() if k != "CNNSERVE_AUTH_TOKEN"}

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args],
            cwd=ROOT,
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=False,
        )

    ok = cli("--token-file", str(token_file), "list")
    assert ok.returncode == 0, ok.stderr
    from_env = cli("list", CNNSERVE_AUTH_TOKEN=TOKEN)
    assert from_env.returncode == 0, from_env.stderr
    refused = cli("list")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: UNAUTHENTICATED"), refused.stderr


# ------------------------------------------------------------------ settings and source


def test_security_settings_are_checked(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("not checked here: grpc reads it at start")
    cases = [
        (
            ["--tls-cert", str(tmp_path / "missing.crt"), "--tls-key", str(pem)],
            {},
            "--tls-cert / CNNSERVE_TLS_CERT=.*no such file",
        ),
        (["--tls-cert", str(pem)], {}, "--tls-key / CNNSERVE_TLS_KEY=None: TLS needs both"),
        ([], {"CNNSERVE_TLS_CLIENT_CA": str(pem)}, "--tls-client-ca .*need TLS"),
        (
            ["--auth-token-file", str(tmp_path / "nope")],
            {},
            "--auth-token-file / CNNSERVE_AUTH_TOKEN_FILE=.*no such file",
        ),
        (["--auth-token-file", str(pem)], {"CNNSERVE_AUTH_TOKEN": "x"}, "both set"),
        ([], {"CNNSERVE_AUTH_TOKEN": "   "}, "CNNSERVE_AUTH_TOKEN: the token is empty"),
        ([], {"CNNSERVE_AUTH_TOKEN": "two words"}, "printable ASCII without spaces"),
    ]
    for argv, env, message in cases:
        with pytest.raises(config.ConfigError, match=message):
            config.load(argv, env)
    settings = config.load([], {"CNNSERVE_AUTH_TOKEN": TOKEN})
    assert config.read_auth_token(settings) == TOKEN
    assert TOKEN not in repr(settings)  # never logged by accident
    assert "--auth-token " not in config.build_parser().format_help()  # no flag: `ps` would show it
    done = subprocess.run(
        [PYTHON, "-m", "serving", "--tls-cert", str(tmp_path / "missing.crt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "--tls-cert / CNNSERVE_TLS_CERT" in done.stderr


def test_pillow_bomb_limit_follows_the_setting(tmp_path: Path) -> None:
    """The server sets Pillow's own limit to --max-image-pixels: even with our check off
    (max_pixels=0 below), Pillow refuses an image above it."""
    before = Image.MAX_IMAGE_PIXELS
    buf = tmp_path / "big.png"
    Image.new("L", (40, 40)).save(buf)
    try:
        images.configure(1000)
        assert Image.MAX_IMAGE_PIXELS == 1000
        with pytest.raises(InvalidArgument, match="decompression bomb"):
            images.open_encoded(buf.read_bytes(), 0, 0)
        images.configure(0)  # 0: Pillow's own default stays
        assert Image.MAX_IMAGE_PIXELS == 1000
    finally:
        Image.MAX_IMAGE_PIXELS = before
    server = (ROOT / "serving" / "server.py").read_text()
    assert "images.configure(settings.max_image_pixels)" in server


FORBIDDEN_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "marshal",
    "shelve",
}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def test_serving_never_unpickles_or_evaluates() -> None:
    """Nothing under serving/ imports a pickle-like module, calls eval/exec/compile, loads numpy
    files with pickles allowed or YAML with arbitrary objects: request bytes and model files
    only ever reach protobuf, numpy.frombuffer, Pillow's image decoders and ONNX Runtime."""
    problems = []
    files = sorted((ROOT / "serving").rglob("*.py"))
    assert len(files) > 10
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                names = set()
            if names & FORBIDDEN_MODULES:
                problems.append(f"{where}: imports {names & FORBIDDEN_MODULES}")
            if isinstance(node, ast.Call):
                func = node.func
                name = (
                    func.id
                    if isinstance(func, ast.Name)
                    else func.attr
                    if isinstance(func, ast.Attribute)
                    else ""
                )
                if name in FORBIDDEN_CALLS and isinstance(func, ast.Name):
                    problems.append(f"{where}: calls {name}()")
                if name == "load" and any(k.arg == "allow_pickle" for k in node.keywords):
                    problems.append(f"{where}: numpy load with allow_pickle")
                if name in ("load", "unsafe_load") and "yaml" in ast.unparse(func):
                    problems.append(f"{where}: yaml.{name}")
    assert not problems, problems

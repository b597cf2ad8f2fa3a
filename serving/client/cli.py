"""The `cnnserve-client` command line (`python -m serving.client`): calls, summaries, pictures."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from serving.client import rollout_cli
from serving.client.sdk import DEFAULT_RETRY, DEFAULT_TARGET, TOKEN_ENV, Client
from serving.config import program_name
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb


def format_summary(s: pb.GetParameterSummaryResponse) -> str:
    rows = [("Layer", "Kind", "Output shape", "Output size", "Params", "How")]
    for layer in s.layers:
        rows.append(
            (
                layer.name,
                layer.kind,
                "(None, " + ", ".join(map(str, layer.output_shape)) + ")",
                layer.output_size_formula,
                f"{layer.parameters:,}",
                layer.formula,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    rule = "-" * max(len(line) for line in lines)
    shape = "x".join(map(str, s.input_shape))
    return "\n".join(
        [
            f"{s.model} v{s.version}, {s.precision or 'fp32'}, input {shape}",
            lines[0],
            rule,
            *lines[1:],
            rule,
            f"Total params: {s.total_parameters:,} (trainable {s.trainable_parameters:,}, "
            f"non-trainable {s.non_trainable_parameters:,})",
            f"One dense neuron over the raw {shape} input would need {s.dense_neuron_formula} weights",
        ]
    )


def _draw_feature_maps(client: Client, args: argparse.Namespace) -> None:
    from serving.client import pictures

    got = client.feature_maps(
        args.model, args.file, layers=args.layer, version=args.version, top_k=args.top_k
    )
    best = ", ".join(f"{label} ({score:.3f})" for label, score in got.labels)
    print(f"{args.file}: {best}")
    for name, values in got.maps.items():
        print(f"  {name} {tuple(values.shape)} max {float(values.max()):.3f}")
    title = f"{got.model} v{got.version}: {args.file.name}"
    pictures.feature_maps_picture(got.image, got.labels, got.maps, got.kinds, title).save(
        args.out, format="PNG"
    )
    print(f"wrote {args.out}")


def _draw_explanation(client: Client, args: argparse.Namespace) -> None:
    from serving.client import pictures

    got = client.explain(
        args.model,
        args.file,
        method=args.method,
        class_index=args.class_index,
        patch=args.patch,
        stride=args.stride,
        version=args.version,
    )
    how = (
        f"occlusion, patch {got.patch} stride {got.stride}, {got.images} images"
        if got.method == "occlusion"
        else f"grad_cam on {got.layer}"
    )
    heat = got.heat
    lines = [
        f"{got.model} v{got.version}: {args.file.name}",
        f"{got.label} ({got.probability:.3f}), class {got.class_index}; {how}",
        f"heat {float(heat.min()):.4f} .. {float(heat.max()):.4f}",
    ]
    for line in lines[1:]:
        print(line)
    pictures.explanation_picture(got.image, heat, lines).save(args.out, format="PNG")
    print(f"wrote {args.out}")


def _draw_filters(client: Client, args: argparse.Namespace) -> None:
    from serving.client import pictures

    got = client.filters(args.model, args.layer, version=args.version)
    k1, k2, cin, cout = got.kernels.shape
    print(f"{got.layer}: {cout} kernels of {k1}x{k2}x{cin}")
    title = f"{got.model} v{got.version}"
    pictures.filters_picture(got.kernels, got.biases, got.layer, title).save(args.out, format="PNG")
    print(f"wrote {args.out}")


def _cli(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=program_name("serving.client"), description="Call a cnnserve server."
    )
    p.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help=f"host:port, ipv4:a:port,b:port or dns:///name:port (default {DEFAULT_TARGET}); "
        "calls spread over every address (round_robin)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call, retries included")
    p.add_argument(
        "--no-retry",
        action="store_true",
        help="attempt each call once (default: UNAVAILABLE is retried, up to 5 attempts)",
    )
    p.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    p.add_argument("--ca-cert", type=Path, help="PEM CA of the server's certificate (implies TLS)")
    p.add_argument("--client-cert", type=Path, help="PEM client certificate, for mutual TLS")
    p.add_argument("--client-key", type=Path, help="PEM private key of --client-cert")
    p.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding the bearer token to send (default: ${TOKEN_ENV} when set)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("classify", help="classify image files (PNG, JPEG, ...)")
    c.add_argument("--model", required=True)
    c.add_argument("--version", type=int, default=0)
    c.add_argument("--top-k", type=int, default=1)
    c.add_argument("files", nargs="+", type=Path)
    s = sub.add_parser("summary", help="the parameter summary of a model")
    s.add_argument("--model", required=True)
    s.add_argument("--version", type=int, default=0)
    fm = sub.add_parser(
        "feature-maps", help="draw each convolution and pooling layer's activations for an image"
    )
    fm.add_argument("file", type=Path, help="an image file (PNG, JPEG, ...)")
    fm.add_argument("--model", required=True)
    fm.add_argument("--version", type=int, default=0)
    fm.add_argument("--layer", action="append", default=[], help="only this layer (repeatable)")
    fm.add_argument("--top-k", type=int, default=3)
    fm.add_argument("--out", type=Path, default=Path("maps.png"), help="PNG to write")
    fi = sub.add_parser("filters", help="draw the kernels of a convolution layer")
    fi.add_argument("--model", required=True)
    fi.add_argument("--version", type=int, default=0)
    fi.add_argument("--layer", default="", help="a convolution layer (default: the first)")
    fi.add_argument("--out", type=Path, default=Path("filters.png"), help="PNG to write")
    ex = sub.add_parser(
        "explain", help="draw which pixels made the model answer as it did (a heat map)"
    )
    ex.add_argument("file", type=Path, help="an image file (PNG, JPEG, ...)")
    ex.add_argument("--model", required=True)
    ex.add_argument("--version", type=int, default=0)
    ex.add_argument("--method", default="occlusion", help="occlusion (default) or grad_cam")
    ex.add_argument(
        "--class", dest="class_index", type=int, help="the class to explain (default: the best)"
    )
    ex.add_argument("--patch", type=int, default=0, help="occlusion's patch side (0: default)")
    ex.add_argument("--stride", type=int, default=0, help="occlusion's stride (0: default)")
    ex.add_argument("--out", type=Path, default=Path("heat.png"), help="PNG to write")
    m = sub.add_parser("metadata", help="a model's metadata")
    m.add_argument("--model", required=True)
    m.add_argument("--version", type=int, default=0)
    sub.add_parser("list", help="models and their versions")
    h = sub.add_parser("health", help="health of the server or one model; exit 0 when SERVING")
    h.add_argument("--service", default="", help="a model name, or empty for the whole server")
    rollout_cli.add_parser(sub)
    args = p.parse_args(argv)
    if args.command == "rollout" and args.action in rollout_cli.WRITING:
        return rollout_cli.write(args)  # the repository's files: no server involved

    token = os.environ.get(TOKEN_ENV, "").strip() or None
    for f in (args.ca_cert, args.client_cert, args.client_key, args.token_file):
        if f is not None and not f.is_file():
            print(f"error: {f}: no such file", file=sys.stderr)
            return 2
    if (args.client_cert is None) != (args.client_key is None):
        print("error: --client-cert and --client-key go together", file=sys.stderr)
        return 2
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
    if args.command in ("feature-maps", "explain") and not args.file.is_file():
        print(f"error: {args.file}: no such file", file=sys.stderr)
        return 2
    if args.command == "classify":
        for f in args.files:
            if not f.is_file():
                print(f"error: {f}: no such file", file=sys.stderr)
                return 2
    try:
        with Client(
            args.target,
            timeout=args.timeout,
            tls=args.tls,
            root_certificates=args.ca_cert,
            client_cert=args.client_cert,
            client_key=args.client_key,
            token=token,
            retry=None if args.no_retry else DEFAULT_RETRY,
        ) as client:
            if args.command == "classify":
                result = client.classify(
                    args.model, args.files, version=args.version, top_k=args.top_k
                )
                for f, top in zip(args.files, result.labels, strict=True):
                    best = ", ".join(f"{label} ({score:.3f})" for label, score in top)
                    print(f"{f}: {best}")
            elif args.command == "summary":
                print(format_summary(client.summary(args.model, args.version)))
            elif args.command == "feature-maps":
                _draw_feature_maps(client, args)
            elif args.command == "filters":
                _draw_filters(client, args)
            elif args.command == "explain":
                _draw_explanation(client, args)
            elif args.command == "metadata":
                md = client.metadata(args.model, args.version)
                print(f"{md.name} v{md.version} (ready: {', '.join(map(str, md.ready_versions))})")
                for spec in md.inputs:
                    print(
                        f"  input  {spec.name}: float32 {list(spec.shape)} ({md.input_layout}, uint8 x {md.input_scale:.6g})"
                    )
                for spec in md.outputs:
                    print(f"  output {spec.name}: float32 {list(spec.shape)}")
                print(f"  dataset {md.dataset}, test accuracy {md.test_accuracy:.4f}")
                print(f"  classes {', '.join(md.class_names)}")
                print(
                    f"  precision {md.precision or 'fp32'}, execution provider {md.execution_provider}"
                )
                if md.role:
                    print(f"  rollout role {md.role} ({md.rollout.state})")
            elif args.command == "list":
                for model in client.list_models().models:
                    versions = ", ".join(
                        f"v{v.version} {v.state}"
                        + (f" {v.role}" if v.role else "")
                        + (f" ({v.reason})" if v.reason else "")
                        for v in model.versions
                    )
                    precision = f" ({model.precision})" if model.precision else ""
                    rollout = model.rollout.state
                    how = f"; rollout {rollout}" if rollout not in ("", "none") else ""
                    print(
                        f"{model.name}: default v{model.default_version}{precision}{how}; "
                        f"{versions}"
                    )
            elif args.command == "rollout":
                return rollout_cli.status(client, args)
            elif args.command == "health":
                status = client.health(args.service)
                print(f"{args.service or 'server'}: {status}")
                return 0 if status == "SERVING" else 1
    except grpc.RpcError as exc:
        code = exc.code()
        print(f"error: {code.name if code else 'UNKNOWN'}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    sys.exit(_cli())


if __name__ == "__main__":
    main()

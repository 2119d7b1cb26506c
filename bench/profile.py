"""``python -m bench.profile``: the footprint of a model, dense and compressed, in seconds.

Runs on random weights with synthetic calibration batches and no fine-tuning, so it needs no data
on disk (``--dataset`` only sets the input shape and the number of classes). Prints params, MACs
(the papers' "FLOPs"), the measured latency of the dense and compressed model, both deployed
(``bench.deploy``) and timed interleaved, one row per (backend, device, batch): ``--backends
torch,onnxruntime``, ``--device cuda``, ``--batch-sizes 1,32`` (the first is the headline), the
reductions, the speedups and a per-layer table; ``--json`` prints one JSON object instead.
Reductions are in percent, as in the reports. ``--list`` names what the other options accept:
the registered methods (family, one-line idea), the models and the datasets.

Examples:
    python -m bench.profile --list
    python -m bench.profile --model vgg16_bn_cifar --dataset cifar10
    python -m bench.profile --model vgg16_bn_cifar --dataset cifar10 --method dct_pruning \\
        --layer-rates "[0.5]*7+[0.95]*5"
    python -m bench.profile --model resnet56_cifar --dataset cifar10 --method svd --ratio 1.5 --json
    python -m bench.profile --model vgg16_bn_cifar --dataset cifar10 --method svd --ratio 4 \\
        --backends torch,onnxruntime --batch-sizes 32,1 --threads 2
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys

from bench.cli import ArgumentParser, UsageError, import_plugins, main_guard
from bench.dataset_info import dataset_info
from bench.names import unknown_method, unknown_model
from bench.study import parse_override
from methods._targets import Target

# torch, timm and the methods are imported by profile(), after check_args(): a typo is answered
# at once, without loading them

__all__ = ["catalogue", "check_args", "main", "profile"]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument(
        "--list", action="store_true", help="list the methods, models and datasets, then exit"
    )
    p.add_argument("--model", help="vgg16_bn_cifar, resnet56_cifar, any timm name (see --list)")
    p.add_argument("--dataset", help="sets input shape and classes (no data read; see --list)")
    p.add_argument("--width", type=float, help="channel-width multiplier of the CIFAR models")
    p.add_argument("--method", help="a registered method (python -m bench.profile --list)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=float, help="params compression target (> 1)")
    target.add_argument("--layer-rates", help="per-layer rates, HRank syntax: '[0.5]*7+[0.95]*5'")
    p.add_argument(
        "--set",
        dest="hps",
        action="append",
        default=[],
        metavar="HP=VALUE",
        help="a method hyperparameter, e.g. --set band=low (repeatable)",
    )
    p.add_argument(
        "--batch-sizes",
        default=None,
        help="latency batches, comma-separated, the first the headline (default 32)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="one latency batch (old spelling)")
    p.add_argument(
        "--backends",
        default="torch",
        help="latency backends, comma-separated: torch, onnxruntime (default torch)",
    )
    p.add_argument("--device", default="cpu", help="latency device of torch: cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="latency threads (default: torch's)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _first_line(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0].strip() if lines else ""


def catalogue() -> dict:
    """What ``--method``, ``--model`` and ``--dataset`` accept, without building anything.

    A method's idea is the first line of its module's docstring (every method file opens with the
    idea), else of its class's; a CIFAR model's is the first line of its factory's docstring.
    """
    import timm

    from bench import models
    from bench.data import DATASETS
    from methods.base import get_method_class, list_methods

    methods = []
    for name in list_methods():
        cls = get_method_class(name)
        module = sys.modules.get(cls.__module__)
        idea = _first_line(module.__doc__ if module else None) or _first_line(cls.__doc__)
        methods.append(
            {"name": name, "family": cls.family, "structured": cls.structured, "idea": idea}
        )
    cifar = models.list_cifar_models()
    return {
        "methods": methods,
        "models": [{"name": n, "about": _first_line(getattr(models, n).__doc__)} for n in cifar],
        "timm_models": len(set(timm.list_models()) - set(cifar)),
        "datasets": list(DATASETS),
    }


def render_catalogue(cat: dict) -> str:
    from tabulate import tabulate

    methods = [
        [m["name"], m["family"], "yes" if m["structured"] else "no", m["idea"]]
        for m in cat["methods"]
    ]
    return "\n".join(
        [
            "Methods (--method NAME; --plugin MODULE registers your own):",
            tabulate(methods, headers=["name", "family", "structured", "idea"]),
            "",
            "Models (--model NAME; --width scales the CIFAR models' channels):",
            tabulate([[m["name"], m["about"]] for m in cat["models"]], tablefmt="plain"),
            f"and any other of timm's {cat['timm_models']} architectures (random weights; "
            "timm.list_models() names them)",
            "",
            "Datasets (--dataset NAME; sets the input shape and classes, no data read): "
            + ", ".join(cat["datasets"]),
        ]
    )


def latency_options(args):
    """``--batch-sizes``/``--batch-size``, ``--backends`` and ``--device`` as a checked
    ``LatencyConfig`` (the study's latency block: the same rules, the same one-line errors)."""
    from bench.study import LatencyConfig, StudyError

    try:
        if args.batch_sizes is not None and args.batch_size is not None:
            raise UsageError("give --batch-sizes or --batch-size, not both")
        text = args.batch_sizes if args.batch_size is None else str(args.batch_size)
        batches = tuple(int(b) for b in (text or "32").split(","))
        backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
        return LatencyConfig(
            device=args.device,
            batch_sizes=batches,
            backends=backends,
            threads=1 if args.threads is None else args.threads,
        )
    except ValueError as err:  # StudyError is one
        what = str(err) if isinstance(err, StudyError) else f"a batch is not a number: {err}"
        raise UsageError(f"latency options: {what}") from None


def check_args(args) -> tuple[dict, Target | None]:
    """The usage errors found without torch, timm or the methods (``bench.names``); returns the
    method's hyperparameters (``--set``) and the target (None without ``--method``)."""
    if args.model is None or args.dataset is None:
        raise UsageError("--model and --dataset are needed (python -m bench.profile --list)")
    latency_options(args)
    dataset_info(args.dataset)
    problem = unknown_model(args.model)
    if problem:
        raise UsageError(problem)
    if args.method is None:
        if args.ratio is not None or args.layer_rates is not None or args.hps:
            raise UsageError("--ratio, --layer-rates and --set need --method")
        return {}, None
    if args.ratio is None and args.layer_rates is None:
        raise UsageError("--method needs a target: --ratio R or --layer-rates SPEC")
    problem = unknown_method(args.method)
    if problem:
        raise UsageError(problem)
    hps = dict(parse_override(text) for text in args.hps)
    target = Target(ratio=args.ratio) if args.ratio is not None else Target.parse(args.layer_rates)
    return hps, target


def profile(args) -> dict:
    """Measure the dense model and, when a method is given, the compressed one."""
    hps, target = check_args(args)
    import torch  # see the note on imports at the top

    from bench import footprint
    from bench.deploy import Timing, deploy
    from bench.models import create_model
    from methods.base import CalibData, CompressionWarning, create_method, no_finetune

    info = dataset_info(args.dataset)
    shape = (info.in_chans, info.height, info.width)
    lat = latency_options(args)
    if lat.device.startswith("cuda") and int(lat.device.partition(":")[2] or 0) >= (
        torch.cuda.device_count()
    ):
        raise UsageError(f"--device {lat.device}: no such CUDA device on this machine")
    threads = args.threads or torch.get_num_threads()
    cases = footprint.latency_cases(lat.device, lat.batch_sizes, lat.backends)
    torch.manual_seed(args.seed)
    dense = create_model(
        args.model, num_classes=info.num_classes, in_chans=info.in_chans, width=args.width
    ).eval()
    out = {
        "model": args.model,
        "dataset": args.dataset,
        "input_shape": list(shape),
        "num_classes": info.num_classes,
        "threads": threads,
        "batch_size": cases[0].batch_size,
        "device": cases[0].device,
        "backend": cases[0].backend,
    }
    fp = footprint.measure(dense, shape, latency=False)
    out["dense"] = {**fp.as_dict(), "layers": footprint.layer_table(dense, shape)}
    if target is None:
        if not args.no_latency:
            out["latency"] = [
                {
                    **dataclasses.asdict(case),
                    "dense_ms": footprint.measure_latency(
                        dense, shape, **dataclasses.asdict(case), threads=threads
                    ),
                }
                for case in cases
            ]
            out["dense"]["latency_ms"] = out["latency"][0]["dense_ms"]
        return out
    method = create_method(args.method, **hps)
    calib = CalibData.synthetic(shape, info.num_classes, n_batches=2, batch_size=16, seed=args.seed)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompressionWarning)
        compressed = method.compress(copy.deepcopy(dense), target, calib, no_finetune()).eval()
    # every layer in its fastest form, measured on the headline case (not without latency)
    head = cases[0] if cases and not args.no_latency else None
    timing = head and Timing(head.device, head.batch_size, threads)
    deployment = deploy(compressed, shape, timing)
    cfp = footprint.measure(compressed, shape, latency=False, deployment=deployment)
    if not args.no_latency:  # both models deployed and timed interleaved, per case
        results = footprint.compare_latencies(
            dense,
            compressed,
            shape,
            cases,
            threads=threads,
            deployed={(1, head.device, head.batch_size): deployment.model},
        )
        out["latency"] = [
            {**dataclasses.asdict(case), "dense_ms": d, "compressed_ms": c, "speedup": d / c}
            for case, (d, c) in results.items()
        ]
        first = out["latency"][0]
        out["dense"]["latency_ms"] = first["dense_ms"]
        fp = dataclasses.replace(fp, latency_ms=first["dense_ms"])
        cfp = dataclasses.replace(cfp, latency_ms=first["compressed_ms"])
    layers = footprint.layer_table(compressed, shape, method, deployment.notes)
    out["method"] = args.method
    out["hyperparameters"] = method.hyperparameters()
    out["target"] = target.label
    out["warnings"] = sorted({str(w.message) for w in caught})
    out["compressed"] = {**cfp.as_dict(), "layers": layers}
    out["params_ratio"] = fp.params / cfp.stored_params
    out["params_reduction"] = 100 * (1 - cfp.stored_params / fp.params)  # percent, as in reports
    out["macs_ratio"] = fp.macs / cfp.macs
    out["macs_reduction"] = 100 * (1 - cfp.macs / fp.macs)
    out["macs_nz_ratio"] = fp.macs / cfp.macs_nz
    out["bytes_ratio"] = fp.model_bytes / cfp.model_bytes
    if fp.latency_ms and cfp.latency_ms:
        out["speedup"] = fp.latency_ms / cfp.latency_ms
    return out


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def render(out: dict) -> str:
    from tabulate import tabulate

    lines = [
        f"{out['model']} on {out['dataset']} input {'x'.join(map(str, out['input_shape']))}, "
        f"{out['num_classes']} classes; latency: {out['threads']} threads, median, deployed"
    ]
    d, c = out["dense"], out.get("compressed")
    rows = [
        ["params", _human(d["params"]), c and _human(c["params"])],
        ["stored params", _human(d["stored_params"]), c and _human(c["stored_params"])],
        ["FLOPs (MACs)", _human(d["macs"]), c and _human(c["macs"])],
        ["FLOPs nz (MACs nz)", _human(d["macs_nz"]), c and _human(c["macs_nz"])],
        ["model bytes", _human(d["model_bytes"]), c and _human(c["model_bytes"])],
    ]
    for case in out.get("latency", []):  # one row per (backend, device, batch)
        compressed_ms = case.get("compressed_ms")
        rows.append(
            [
                f"latency (ms) {case['backend']} {case['device']} batch {case['batch_size']}",
                f"{case['dense_ms']:.2f}",
                compressed_ms and f"{compressed_ms:.2f}",
            ]
        )
    headers = ["", "dense"] + ([f"{out['method']} @ {out['target']}"] if c else [])
    rows = [r[: len(headers)] for r in rows]
    lines.append(tabulate(rows, headers=headers))
    if c:
        lines.append(
            f"params -{out['params_reduction']:.1f}% ({out['params_ratio']:.2f}x), "
            f"MACs -{out['macs_reduction']:.1f}% ({out['macs_ratio']:.2f}x), "
            f"MACs nz {out['macs_nz_ratio']:.2f}x, bytes {out['bytes_ratio']:.2f}x"
        )
        for case in out.get("latency", []):
            lines.append(
                f"measured speedup {case['speedup']:.2f}x ({case['backend']} on "
                f"{case['device']}, batch {case['batch_size']}, {out['threads']} threads)"
            )
        lines.append(f"deployed: {c['deployed']}")
        for w in out["warnings"]:
            lines.append(f"warning: {w}")
    layers = (c or d)["layers"]
    lines.append("")
    lines.append(tabulate(layers, headers="keys"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import_plugins(args.plugin)
    if args.list:
        cat = catalogue()
        print(json.dumps(cat, indent=1) if args.json else render_catalogue(cat))
        return 0
    out = profile(args)
    print(json.dumps(out, indent=1) if args.json else render(out))
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main, "bench.profile", "--batch-sizes (the latency batches) or --width")())

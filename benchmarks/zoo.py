"""bnaudit on a zoo of architectures: does ``inspect --data`` crash, does it raise error-level findings on fresh
(randomly initialised) models, and what does it cost next to one training step?

Every fixture architecture of ``tests/fixtures/architectures.py`` (ResNets with and without zero-initialised
residual gammas, EfficientNet, MobileNetV2, DenseNet, U-Net, ViT, MaxViT, RmsNorm/EvoNorm networks, a model
evaluated at load with its ``predict()``...), plus EfficientNet-B0 at full width, plus timm and torchvision
models when those packages are importable (never required), each inspected through the Python API
(``bnaudit.inspect(model, batch, predict=...)``) on one small batch: 4 images (at ``--size`` px for image
models, 128 by default), or the fixture's own example batch for sequence and tabular models.

Cost is the wall time of one ``inspect`` divided by the time of one train-mode forward + backward of the
same model on the same batch (cross-entropy against fixed labels, no optimizer step), both on one torch
thread (``--threads``), each the median of ``--repeats`` runs after a warm-up run, timed interleaved so that
load on a shared machine hits both alike. The table prints per model: the two times, the multiple, the
error-level findings (there should be none) and any crash; the last line is the median multiple over the
fixture models (the headline figure), and over every model timed.

Run: ``python benchmarks/zoo.py`` (a few minutes on a 2-core CPU); ``--quick`` (one repeat, fixtures only at
64 px); ``--only NAME,NAME`` picks models; ``--no-extra`` skips timm/torchvision."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bnaudit  # noqa: E402
from tests.fixtures import architectures as A  # noqa: E402


@dataclass
class Entry:
    name: str
    build: object
    example: object
    predict: object = None
    fixture: bool = True


def _images(size: int):
    return lambda: torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))


def entries(size: int, extra: bool) -> list[Entry]:
    out = []
    for arch in A.ARCHITECTURES:
        example = arch.example
        probe = example()
        if isinstance(probe, torch.Tensor) and probe.dim() == 4 and probe.shape[1] == 3:
            # image models at the benchmark's size, with the fixture's own batch where the model needs a
            # particular size (a ViT's patch count is fixed)
            fixed = arch.name.startswith("vit_") or arch.name == "maxvit"
            example = _images(probe.shape[-1] if fixed else size)
        out.append(Entry(arch.name, arch.build, example, arch.predict))
    out.append(Entry("efficientnet_b0", A.efficientnet_b0, _images(size), fixture=False))
    if extra:
        out += _extra(size)
    return out


def _extra(size: int) -> list[Entry]:
    """timm and torchvision models, when installed: optional, never required."""
    found = []
    try:
        import timm  # type: ignore[import-not-found]

        for name in ("resnet26t", "efficientnet_b0", "repvit_m1", "regnetx_002", "maxvit_rmlp_nano_rw_256"):
            def build(name=name):
                torch.manual_seed(0)
                return timm.create_model(name, pretrained=False, num_classes=10)

            found.append(Entry(f"timm:{name}", build, _images(256 if "maxvit" in name else size), fixture=False))
    except ImportError:
        pass
    try:
        import torchvision  # type: ignore[import-not-found]

        for name in ("resnet18", "mobilenet_v3_small", "efficientnet_b0"):
            def build(name=name):
                torch.manual_seed(0)
                kwargs = {"zero_init_residual": True} if name.startswith("resnet") else {}
                return getattr(torchvision.models, name)(num_classes=10, **kwargs)

            found.append(Entry(f"torchvision:{name}", build, _images(size), fixture=False))
    except ImportError:
        pass
    return found


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    out = model(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    target = torch.zeros(out.shape[0], dtype=torch.long)
    loss = nn.functional.cross_entropy(out.reshape(out.shape[0], -1), target) if out.dim() >= 2 else out.sum()
    loss.backward()
    model.zero_grad(set_to_none=True)


def measure(entry: Entry, repeats: int) -> dict:
    row: dict = {"name": entry.name, "fixture": entry.fixture}
    try:
        model = entry.build()
        x = entry.example()
        trainable = any(p.requires_grad for p in model.parameters())
        step_model = entry.build()
        step_model.train()
        step_model.requires_grad_(True)
        report = bnaudit.inspect(model, x, predict=entry.predict)  # warm-up, and the findings
        train_step(step_model, x)
        inspect_t, step_t = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            bnaudit.inspect(model, x, predict=entry.predict)
            inspect_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            train_step(step_model, x)
            step_t.append(time.perf_counter() - t0)
        row["inspect_s"] = statistics.median(inspect_t)
        row["step_s"] = statistics.median(step_t)
        row["multiple"] = row["inspect_s"] / row["step_s"]
        row["errors"] = sorted({f.code for f in report.findings if f.severity == "error"})
        row["warnings"] = sorted({f.code for f in report.findings if f.severity == "warning"})
        row["internal"] = sorted(c for c, why in report.rules_skipped.items() if "internal error" in why)
        row["trainable"] = trainable
    except Exception as exc:  # noqa: BLE001 - a crash is a result here
        row["crash"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
        row["trace"] = traceback.format_exc()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128, help="image size for image models (default 128)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--no-extra", action="store_true", help="skip timm/torchvision even when installed")
    ap.add_argument("--quick", action="store_true", help="one repeat at 64 px, fixtures only")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.repeats, args.no_extra = 64, 1, True
    torch.set_num_threads(args.threads)
    chosen = [e for e in entries(args.size, not args.no_extra) if not args.only or e.name in args.only.split(",")]
    print(f"torch {torch.__version__}, {args.threads} thread(s), images 4 x 3 x {args.size} x {args.size}, "
          f"median of {args.repeats}")
    print(f"{'model':34s} {'inspect':>9s} {'fwd+bwd':>9s} {'multiple':>9s}  errors / crashes")
    rows = []
    for entry in chosen:
        row = measure(entry, args.repeats)
        rows.append(row)
        if "crash" in row:
            print(f"{row['name']:34s} {'':>9s} {'':>9s} {'':>9s}  CRASH {row['crash']}")
            continue
        bad = ", ".join(row["errors"] + [f"internal error in {c}" for c in row["internal"]]) or "-"
        print(f"{row['name']:34s} {row['inspect_s'] * 1e3:7.0f}ms {row['step_s'] * 1e3:7.0f}ms "
              f"{row['multiple']:8.1f}x  {bad}")
    timed = [r for r in rows if "multiple" in r]
    fixtures = [r["multiple"] for r in timed if r["fixture"]]
    crashes = [r["name"] for r in rows if "crash" in r]
    errors = [r["name"] for r in timed if r["errors"] or r["internal"]]
    print()
    if fixtures:
        print(f"median multiple over {len(fixtures)} fixture models: {statistics.median(fixtures):.1f}x "
              f"one forward+backward")
    if timed:
        print(f"median multiple over all {len(timed)} timed models: "
              f"{statistics.median(r['multiple'] for r in timed):.1f}x")
    print(f"crashes: {', '.join(crashes) or 'none'}; "
          f"error-level findings on fresh models: {', '.join(errors) or 'none'}")
    for r in rows:
        if "trace" in r:
            print(f"\n{r['name']}:\n{r['trace']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

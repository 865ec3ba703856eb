"""What bnaudit.record costs: median training-step time with the recorder against the same step without
hooks, and against a fastai-style baseline, plus memory growth over a run of steps.

Three models, one training step each (forward, cross-entropy, backward, SGD):
  (a) a 3 x 100 sigmoid MLP on sklearn's digits, batch 64;
  (b) a 10-layer 256-wide ReLU MLP, batch 128;
  (c) a ResNet-18-like CNN (7x7/2 stem, max-pool, 4 stages of 2 BasicBlocks) on 3 x 64 x 64, batch 32.
Variants, each on its own copy of the model with its own optimizer, timed interleaved in one process: each
round runs a block of consecutive steps of every variant, in a shuffled order, so drift in machine load hits
all alike while each variant still runs as a training loop does, step after step (the recorder may reduce a
step on its own thread during the next one, or a batch of small steps at once: the last step of a block
includes reducing and writing whatever is still pending, as a read of the history would, and the first step
of a block is not timed). Blocks are 100 steps for (a), 20 for (b) and 3 for (c): long enough to span several
of the recorder's batches of small steps (14 of (a)'s) and `every=10`'s recorded steps, as a training loop
that reads its history now and then does; a shorter block charges each block a partial batch reduced while
the caller waits (with 20-step blocks (a) measured about 0.05x more). The ratio printed is paired: each round's block time over the unhooked
block time of the same round, median over rounds, so that a slow stretch of a shared machine cancels instead
of landing on whichever variant ran then; the median step time is printed beside it:
  none        no hooks;
  scalar      bnaudit.record(per_channel=False);
  channel     bnaudit.record() (per-channel mean/variance, BatchNorm buffers and modes);
  every10     bnaudit.record(every=10): the same, one step in ten;
  watch       bnaudit.watch(): the model found from its optimizer's steps (no rec.step() in the loop), the
              same recorder plus the live checks' BatchNorm hooks and the global optimizer step hooks;
  fastai      ActivationStats-style hooks on the same modules: the output copied to the CPU, then mean,
              std and the near-zero fraction, each read with .item(), per module per step.
Memory: after the timing rounds, each variant in turn runs ``--steps`` more steps (500 by default) and the
growth of the process's resident set (sampled after every step, peak minus start) is printed next to the
bytes of history the recorder reports keeping.

Run: ``python benchmarks/record_overhead.py`` (about 10 minutes on a 2-core CPU) or ``--quick`` (a minute).
``--models a,b`` picks models; ``--device cuda`` runs on a GPU. ``--threads 1`` fixes torch to one thread: on a
machine shared with other work, a 2-thread step waits on whichever core is busy (medians then swing by 10x
between runs), while one thread gives every variant the same single core.

Reading the fastai-style ratio on a CPU: there ``.cpu()`` is a no-op and ``.item()`` a memory read, so the
baseline pays only for its reductions; on an accelerator each ``.item()`` is a host synchronisation and each
``.cpu()`` a device-to-host copy of the whole activation, which the recorder never does."""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bnaudit
from bnaudit.recording import default_layers
from bnaudit.recording.recorder import reduce_call

VARIANTS = ("none", "floor", "scalar", "channel", "every10", "watch", "fastai")
# The restated targets: per-channel ratio at most this, and the recorder's overhead at most 2/3 of fastai-style's.
TARGETS = {"a": 1.35, "b": 1.20, "c": 1.06}


def mlp_sigmoid() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 100), nn.Sigmoid(), nn.Linear(100, 100), nn.Sigmoid(),
                         nn.Linear(100, 100), nn.Sigmoid(), nn.Linear(100, 10))


def mlp_relu() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(10):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.down is None else self.down(x)))


def resnet18(num_classes: int = 10) -> nn.Module:
    stages, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
        cin = cout
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
        *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes),
    )


def digits_batches(batch: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        out.append((x[idx], y[idx]))
    return out


def random_batches(shape: tuple[int, ...], batch: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


MODELS = {
    "a": ("3x100 sigmoid MLP, digits, batch 64", mlp_sigmoid, lambda n: digits_batches(64, n)),
    "b": ("10x256 ReLU MLP, batch 128", mlp_relu, lambda n: random_batches((256,), 128, n)),
    "c": ("ResNet-18-like, 3x64x64, batch 32", resnet18, lambda n: random_batches((3, 64, 64), 32, n)),
}


class FastaiStyle:
    """ActivationStats as fastai does it: outputs to the CPU, three statistics each read with .item()."""

    def __init__(self, model: nn.Module):
        self.stats: list[tuple[float, float, float]] = []
        named = dict(model.named_modules())
        self.handles = [named[n].register_forward_hook(self.hook) for n in default_layers(model)]

    def hook(self, module: nn.Module, args, out) -> None:
        o = out.detach().cpu().float()
        self.stats.append((o.mean().item(), o.std().item(), (o <= 0.05).float().mean().item()))

    def step(self) -> None:
        pass

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class Floor:
    """The floor under the recorder: plain hooks on the same modules running the recorder's own per-call
    reductions (``reduce_call``) and keeping nothing: no layout, no row, no transfer, no bookkeeping."""

    def __init__(self, model: nn.Module):
        named = dict(model.named_modules())
        self.handles = []
        for n, where in default_layers(model).items():
            if where == "input":
                self.handles.append(named[n].register_forward_pre_hook(lambda m, a: self.reduce(a[0])))
            else:
                self.handles.append(named[n].register_forward_hook(lambda m, a, o: self.reduce(o)))

    @staticmethod
    def reduce(x: torch.Tensor) -> None:
        x = x.detach()
        reduce_call(x.reshape(x.shape[0], x.shape[1], -1) if x.dim() > 2 else x)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class Runner:
    def __init__(self, variant: str, base: nn.Module, device: torch.device):
        self.variant = variant
        self.model = copy.deepcopy(base).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.rec = None
        self.fastai = None
        self.watch = None
        if variant == "watch":  # only this runner's optimizer: the other variants' models stay unwatched
            self.watch = bnaudit.watch(only=[self.opt])
            self.watch.__enter__()
        elif variant in ("scalar", "channel", "every10"):
            self.rec = bnaudit.record(self.model, per_channel=variant != "scalar", every=10 if variant == "every10" else 1)
            self.rec.__enter__()
        elif variant == "fastai":
            self.fastai = FastaiStyle(self.model)
        elif variant == "floor":
            self.fastai = Floor(self.model)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        if self.rec is not None:
            self.rec.step()

    @property
    def history(self):
        """The recorder's history (for ``watch``: the one of the model it found), or None."""
        if self.rec is not None:
            return self.rec.history
        if self.watch is not None and self.watch.models:
            return self.watch.models[0].history
        return None

    def settle(self) -> None:
        """Wait until the recorder has written every step taken (on an accelerator the last row's host copy
        may still be in flight)."""
        h = self.history
        if h is not None and h.settle is not None:
            h.settle()

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        if self.rec is not None:
            self.rec.__exit__(None, None, None)
        if self.fastai is not None:
            self.fastai.close()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(key: str, rounds: int, block: int, mem_steps: int, device: torch.device) -> dict:
    title, factory, data = MODELS[key]
    torch.manual_seed(0)
    base = factory()
    batches = [(x.to(device), y.to(device)) for x, y in data(32)]
    runners = {v: Runner(v, base, device) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    per_round: dict[str, list[float]] = {v: [] for v in VARIANTS}  # each round's block time
    rnd = random.Random(0)
    for r in range(rounds + 1):  # round 0 warms up
        order = list(VARIANTS)
        rnd.shuffle(order)
        for v in order:
            run = runners[v]
            start = len(times[v])
            for i in range(block):
                x, y = batches[(r * block + i) % len(batches)]
                sync(device)
                t0 = time.perf_counter()
                run.step(x, y)
                if i == block - 1:
                    run.settle()
                sync(device)
                if r and i:
                    times[v].append(time.perf_counter() - t0)
            if r:
                per_round[v].append(sum(times[v][start:]))
    med = {v: statistics.median(times[v]) for v in VARIANTS}
    # Ratios are paired: each round's block time against the unhooked block of the same round, then the median
    # over rounds, so that a slow stretch of the machine (a busy neighbour) cancels instead of landing on
    # whichever variant ran then.
    ratio = {v: statistics.median(a / b for a, b in zip(per_round[v], per_round["none"])) for v in VARIANTS}
    mem: dict[str, tuple[int, int]] = {}
    for v in VARIANTS:
        run = runners[v]
        rows0 = len(run.history) if run.history is not None else 0
        start = rss_bytes()
        peak = start
        for s in range(mem_steps):
            x, y = batches[s % len(batches)]
            run.step(x, y)
            peak = max(peak, rss_bytes())
        per_step = run.history.bytes_per_step if run.history is not None else 0
        kept = (len(run.history) - rows0) * per_step if run.history is not None else 0
        mem[v] = (peak - start, kept, per_step)
    for run in runners.values():
        run.close()
    return {"title": title, "median": med, "ratio": ratio, "mem": mem, "rounds": rounds, "block": block}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and memory steps (about a minute)")
    ap.add_argument("--models", default="a,b,c", help="which models: a, b, c (comma-separated)")
    ap.add_argument("--rounds", type=int, default=None, help="timed interleaved rounds (a block of steps per variant)")
    ap.add_argument("--steps", type=int, default=None, help="steps per variant for the memory measurement")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    print(f"bnaudit {bnaudit.__version__}, torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    for key in keys:
        heavy = key == "c" and device.type == "cpu"
        rounds = args.rounds or ((4 if heavy else 8) if args.quick else (20 if heavy else 30))
        block = 3 if heavy else (100 if key == "a" else 20)
        steps = args.steps or ((20 if heavy else 100) if args.quick else 500)
        res = bench(key, rounds, block, steps, device)
        med, ratio = res["median"], res["ratio"]
        base = med["none"]
        print(f"\n({key}) {res['title']}: median step {base * 1e3:.2f} ms unhooked, {rounds} interleaved rounds "
              f"of {block} steps")
        print(f"  {'variant':<9} {'median ms':>10} {'ratio':>7} {'overhead':>9}   memory growth over {steps} steps")
        for v in VARIANTS:
            grow, kept, per_step = res["mem"][v]
            extra = f"; history keeps {kept / 1e6:.2f} MB ({per_step} B/recorded step)" if v != "none" and v != "fastai" else ""
            print(f"  {v:<9} {med[v] * 1e3:>10.3f} {ratio[v]:>7.3f} {100 * (ratio[v] - 1):>8.1f}%"
                  f"   {grow / 1e6:+.2f} MB RSS{extra}")
        over_fa = ratio["fastai"] - 1
        for v in ("channel", "scalar", "every10", "watch"):
            over = ratio[v] - 1
            share = over / over_fa if over_fa > 0 else float("inf")
            print(f"  bnaudit {v} overhead / fastai-style overhead = {share:.2f}")
        if key in TARGETS:
            over = ratio["channel"] - 1
            ok_ratio = ratio["channel"] <= TARGETS[key]
            ok_share = over <= 2 / 3 * over_fa
            print(f"  targets: per-channel ratio {ratio['channel']:.3f} <= {TARGETS[key]} "
                  f"{'met' if ok_ratio else 'MISSED'}; overhead <= 2/3 of fastai-style's {'met' if ok_share else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

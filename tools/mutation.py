"""Mutation testing of the rule and probe modules: break the code plausibly, run the fast tests, count survivors.

Not part of CI (a full run takes tens of minutes on two cores). mutmut 3.8 installs and runs on this project,
but it also mutates the rules' example factories (which are the tests: every rule's ``valid``/``invalid`` cases
are built there), mutates message strings, and spent six minutes generating mutants for the whole package
before running any. This is a small AST mutator instead, with the operators that found real gaps:

    compare   ``<`` <-> ``<=``, ``>`` <-> ``>=``, ``==`` <-> ``!=``, ``in`` <-> ``not in``, ``is`` <-> ``is not``
    boolop    ``and`` <-> ``or``
    anyall    ``any(...)`` <-> ``all(...)``
    const     an int constant n -> n + 1, a float x -> 2x (0.0 -> 1.0): thresholds and defaults off
    dropcond  a conjunct of ``a and b`` dropped (each in turn); an ``if``/``elif`` test or a comprehension's
              ``if`` -> True; ``not x`` -> ``x``

Mutated: code in functions, methods and class attributes (a rule's ``defaults``). Not mutated: docstrings,
f-strings and messages (strings are never changed), type annotations, ``__all__``, and the example factories,
that is every module-level function or class named in a rule's ``valid``/``invalid`` cases (and whatever those
name in turn). Each mutant is spliced into the source text at the node's position (the rest of the file is
untouched), written into a private copy of the repository, and the module's fast tests run there with ``-x`` and
a timeout (a timeout counts as killed: the mutant broke something). Mutants that survive and cannot be killed,
because no input can tell them apart from the original, are listed in ``EQUIVALENT`` below with the reason,
and reported as equivalent rather than surviving.

Run from the repository root::

    python tools/mutation.py                          # every mutant of bnaudit/rules and bnaudit/probes
    python tools/mutation.py --sample 150 --seed 1    # a random sample, for a quicker estimate
    python tools/mutation.py bnaudit/rules/architecture.py --list   # the mutants, without running them
    python tools/mutation.py --jobs 2 --json mutation.json

Exit status 0 when the surviving fraction (equivalents excluded) is under ``--max-survival`` (10%), else 1."""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATHS = ("bnaudit/rules", "bnaudit/probes")
EXAMPLES = "tests/rules/test_examples.py"
KILLS = "tests/rules/test_mutation_kills.py"  # edge cases found by this tool: quick, so they run first

# Edge cases found by this tool, one file per family of modules: quick, so they run first.
K_STATIC = "tests/rules/test_kills_static.py"  # BN1xx: rules/architecture, layer_settings, base, catalog, common
K_DATA = "tests/rules/test_kills_data.py"  # BN2xx: rules/data
K_DATA_PROBE = "tests/rules/test_kills_data_probe.py"  # their probe: probes/data
K_MODES = "tests/rules/test_kills_modes.py"  # BN3xx: rules/modes, rules/running_stats
K_MODES_PROBES = "tests/rules/test_kills_modes_probes.py"  # their probes: probes/running_stats, common, state
K_PROBES = "tests/rules/test_kills_probes.py"  # probes/inference, train_eval, eval_steps
K_DIST = "tests/rules/test_kills_distributed.py"  # BN4xx: rules/distributed
ARCH = ["tests/test_architectures.py", "tests/rules/test_architecture.py", "tests/rules/test_architecture_issue19.py"]
MODES = ["tests/rules/test_modes.py", "tests/test_probes_modes.py"]
DATA = [[K_DATA, K_DATA_PROBE], [KILLS, "tests/rules/test_padding_margin.py"], [EXAMPLES, "-k", "BN2"],
        ["tests/rules/test_data.py", "tests/rules/test_output_layers.py"]]

# The fast tests that judge each module: its family's rule examples and its family's unit tests.
# Commands run in order; the first failure kills the mutant, so the quickest come first.
TESTS: dict[str, list[list[str]]] = {
    "bnaudit/rules/base.py": [[K_STATIC], [EXAMPLES, "-k", "BN1 or BN3"], ["tests/test_config.py", "tests/test_cli.py"]],
    "bnaudit/rules/catalog.py": [[K_STATIC], [EXAMPLES, "-k", "BN1 or BN3"], ["tests/test_config.py", "tests/test_cli.py"]],
    "bnaudit/rules/architecture.py": [[K_STATIC], [EXAMPLES, "-k", "BN1"], ARCH],
    "bnaudit/rules/layer_settings.py": [[K_STATIC], [EXAMPLES, "-k", "BN1"], ARCH],
    "bnaudit/rules/common.py": [[K_STATIC, K_MODES], [KILLS], [EXAMPLES, "-k", "BN1 or BN3"], MODES],
    "bnaudit/rules/data.py": DATA,
    "bnaudit/probes/data.py": DATA,
    "bnaudit/rules/modes.py": [[K_MODES], [KILLS], [EXAMPLES, "-k", "BN3"], MODES],
    "bnaudit/rules/running_stats.py": [[K_MODES], [KILLS], [EXAMPLES, "-k", "BN3"], MODES],
    "bnaudit/probes/common.py": [[K_MODES_PROBES, K_MODES, K_PROBES], [KILLS], [EXAMPLES, "-k", "BN3"], MODES],
    "bnaudit/probes/running_stats.py": [[K_MODES_PROBES, K_MODES], [KILLS], [EXAMPLES, "-k", "BN3"], MODES],
    "bnaudit/probes/state.py": [["tests/test_probes_state.py", K_MODES_PROBES, K_MODES], [KILLS], [EXAMPLES, "-k", "BN3"],
                                MODES],
    "bnaudit/probes/inference.py": [[K_PROBES], [KILLS], [EXAMPLES, "-k", "BN3"], MODES],
    "bnaudit/probes/train_eval.py": [[K_PROBES], [KILLS], [EXAMPLES, "-k", "BN3"], MODES],
    "bnaudit/probes/eval_steps.py": [[K_PROBES, "tests/rules/test_bn307_history.py"], [KILLS], [EXAMPLES, "-k", "BN3"], MODES],
    # BN4xx examples need a process group: test_examples skips them, the two-rank gloo tests run them.
    "bnaudit/rules/distributed.py": [[K_DIST], [KILLS, "-k", "bn40"], ["tests/distributed/test_local.py"],
                                     ["tests/distributed/test_gloo.py", "-k", "bn40"]],
}
# The rules' example factories are the tests' inputs, not code under test (as the factories the rule modules
# used to hold, see _example_factories).
SKIP_FILES = ("__init__.py", "examples.py", "examples_architecture.py", "examples_data.py",
              "examples_distributed.py", "examples_modes.py")

# Survivors no test can kill: the mutated program behaves like the original on every input. Keyed by
# Mutant.key (file, enclosing function, operator, original -> replacement), so edits elsewhere keep the key.
EQUIVALENT: dict[str, str] = {
    "bnaudit/probes/data.py:_labels:dropcond:t.dtype == torch.bool -> True":
        "t.long() on an integer tensor is a copy of the same values, and the line after converts with .long() anyway",
    "bnaudit/probes/data.py:_Hooks.relu_hook.hook:dropcond:isinstance(out, torch.Tensor) and out.dim() >= 1 "
    "and out.is_floating_point() -> (isinstance(out, torch.Tensor)) and (out.dim() >= 1)":
        "(out > 0).any(...) gives the same answer on integer tensors",
    "bnaudit/rules/catalog.py:select_rules:dropcond:ignore and matches(rule.code, rule.name, ignore) -> "
    "(matches(rule.code, rule.name, ignore))":
        "matches() over no patterns is False, which is what the dropped 'ignore and' gave",
    "bnaudit/probes/train_eval.py:frozen_bn_drift:dropcond:nbt0 is not None and nbt1 is not None -> (nbt0 is not None)":
        "both counts come from the same layer's num_batches_tracked: both are None or neither is",
    "bnaudit/rules/data.py:VanishingOrExploding.check:dropcond:n in named and is_weight_layer(named[n]) -> "
    "(is_weight_layer(named[n]))":
        "the history's layers are module names of the probe's copy of ctx.model, so every one is in named",
    "bnaudit/probes/train_eval.py:FrozenResult:const:0 -> 1":
        "a dataclass default never read: every FrozenResult is built with all four fields",
    "bnaudit/probes/common.py:_varies:compare:> -> >=":
        "a one-element tensor never differs from its own first element: the any() is False either way",
    "bnaudit/probes/data.py:_Hooks.tail_hook.hook:dropcond:isinstance(x, torch.Tensor) and "
    "x.is_floating_point() and x.numel() -> (isinstance(x, torch.Tensor)) and (x.is_floating_point())":
        "an empty tensor adds 0 of 0 to the tally, and tallies with no values are dropped afterwards",
    # Not equivalent in the strict sense: they differ only at a bit-exact tie or far below the precision the
    # code claims, so no test short of restating the formula or staging the tie would notice.
    "bnaudit/rules/data.py:_t_quantile:const:945 -> 946":
        "moves the t quantile by z / (92160 dof**4): 110 to 7300 times less than the expansion's own error against "
        "the exact quantile at 2 to 100 dof, at least twice less beyond wherever the change exceeds 1e-15",
    "bnaudit/rules/data.py:VanishingOrExploding.check:compare:< -> <= #3":
        "differs only when the fitted per-layer factor (exp of a least-squares slope of logs) is 1.0 to the last "
        "bit with the ratio already past the limit; as BatchStatNoise's '>' vs '>='",
    # --- BN1xx rules and the rule machinery (their edge tests: K_STATIC) ---
    "bnaudit/rules/architecture.py:RedundantBias.check:compare:<= -> <":
        "an edge keeps at most _MAX_VIA (12) ops and RESHAPE_FUNCTIONS has 13 names: set(e.via) is never all of "
        "it, so subset and proper subset agree",
    "bnaudit/rules/architecture.py:BNAfterActivation._activation_between:dropcond:mod is not None and "
    "is_activation(mod) -> (is_activation(mod))":
        "is_activation is an isinstance check: is_activation(None) is False, as the dropped 'mod is not None' gave",
    "bnaudit/rules/architecture.py:BNAfterActivation.check:dropcond:src_module is not None and "
    "is_activation(src_module) -> (is_activation(src_module))":
        "is_activation is an isinstance check: is_activation(None) is False, as the dropped test gave",
    "bnaudit/rules/architecture.py:_parameter_free:dropcond:not is_batchnorm(node.module) and not any(True for _ in "
    "node.module.parameters(recurse=False)) -> (not any(True for _ in node.module.parameters(recurse=False)))":
        "its only caller (NormOnOutput.check) asks it in the elif after is_batchnorm(node.module) was False",
    "bnaudit/rules/architecture.py:DropoutBeforeBN.check:const:0.0 -> 1.0":
        "the getattr default is read only for is_dropout modules, torch's dropout classes, which all have p",
    "bnaudit/rules/architecture.py:UnusedNormalization.check:dropcond:not isinstance(p, "
    "nn.parameter.UninitializedParameter) -> True":
        "no rule sees an uninitialized parameter: run_audit deep-copies the model first and torch refuses to "
        "deep-copy one (the audit fails before any rule runs)",
    "bnaudit/rules/layer_settings.py:_median_input_var:dropcond:cv.ndim == 2 and cv.shape[1] -> (cv.ndim == 2)":
        "as 'and -> or' there: only a series of width 0 tells them apart, and no BatchNorm over 0 channels runs",
    "bnaudit/rules/layer_settings.py:_median_input_var:boolop:and -> or":
        "differs only for a channel series of width 0, the input of a BatchNorm over 0 channels, which torch "
        "cannot run (batch_norm raises IndexError), so no history holds one",
    "bnaudit/rules/layer_settings.py:_median_input_var:dropcond:cv.ndim == 2 and cv.shape[1] -> (cv.shape[1])":
        "History.series of a per-channel statistic is always 2-D ((rows, width) per segment, or zeros((0, width)))",
    "bnaudit/rules/layer_settings.py:EpsTooLarge._measure:dropcond:ctx.data is not None -> True":
        "without data the probe reads no batches: its history has no rows, _median_input_var gives None and the "
        "recorded history is asked, as before; only the empty probe's time is lost",
    "bnaudit/rules/common.py:audit_batches:compare:is -> is not #2":
        "batches[:None] is every batch; the callers that pass a limit (limit=1: BN305, BN308) read only the first "
        "batch, with next(), which the whole list gives too",
    "bnaudit/rules/catalog.py:_did_you_mean:const:1 -> 2":
        "difflib.get_close_matches returns the best match first whatever n is; only close[0] is read",
    #
    # --- BN2xx rules and the data probe (K_DATA, K_DATA_PROBE) ---
    #
    "bnaudit/rules/data.py:NonIidBatches.check:dropcond:order is not None and len(np.unique(order)) > 1 and "
    "np.all(np.diff(order) >= 0) -> (len(np.unique(order)) > 1) and (np.all(np.diff(order) >= 0))":
        "np.unique(None) is array([None]), of length 1: the '> 1' test is False for a None order already",
    "bnaudit/rules/data.py:NonIidBatches.check:dropcond:order is not None and len(np.unique(order)) > 1 -> "
    "(len(np.unique(order)) > 1)":
        "np.unique(None) is array([None]), of length 1: the '> 1' test is False for a None order already",
    "bnaudit/rules/data.py:TooFewValuesPerChannel.check:dropcond:smallest is not None and batch == smallest and "
    "smallest != getattr(data, \"batch_size\", None) -> (batch == smallest) and (smallest != getattr(data, "
    "\"batch_size\", None))":
        "when smallest is None, batch (an int) == smallest is False already",
    "bnaudit/rules/data.py:_bn_names:dropcond:n and is_batchnorm(m) -> (is_batchnorm(m))":
        "adds only the unnamed root, when the whole model is a BatchNorm; the probe neither hooks nor records the "
        "root, so BN202 and BN203 skip it either way (no spatial entry, not in the history)",
    "bnaudit/rules/data.py:_purity:const:0.0 -> 1.0":
        "no empty batch reaches it: _labels gives None for empty targets (then probe.targets is None), and "
        "np.split at the batches' own cumulative sizes gives no empty part",
    "bnaudit/rules/data.py:UnnormalizedInput.check:const:1.0 -> 2.0":
        "the 1.0 only stands in for a dead feature's std to avoid dividing by zero; the outer np.where replaces "
        "every such entry by 0.0",
    "bnaudit/rules/data.py:PaddingInBnInput.check:const:0 -> 1":
        "the default of zero_samples.get is never used: the probe's zero hook fills zero_samples for every layer "
        "it fills zero_positions for",
    "bnaudit/rules/data.py:VanishingOrExploding.check:compare:> -> >=":
        "at s[k] == 0 both give ratio 0.0: s[0] is finite and positive there (checked above), and 0.0 / s[0] is 0.0",
    "bnaudit/probes/data.py:_labels:compare:== -> != #2":
        "converts non-bool integer tensors with .long() instead of bool ones; the return converts with .long() "
        "anyway, giving the same values",
    "bnaudit/probes/data.py:_Hooks.fill:dropcond:v[1] -> True #2":
        "the tail hook tallies only tensors with x.numel() > 0, so every tail tally has a nonzero count",
    #
    # --- BN3xx rules and their probes (K_MODES, K_MODES_PROBES) ---
    "bnaudit/rules/modes.py:BatchDependentInference.check:dropcond:single and not changed and not "
    "(res.batch_stat_layers or \"value per channel\" in single) -> (single) and (not (res.batch_stat_layers or "
    "\"value per channel\" in single))":
        "when changed is True nothing after this line reads single (the early return needs not changed, the "
        "message the change), so the dropped 'not changed' only ever clears a value that is not read",
    "bnaudit/rules/modes.py:BatchDependentInference.check:dropcond:layer in res.train_mode_layers and reported -> "
    "(layer in res.train_mode_layers)":
        "a non-empty train_mode_layers always yields the train-mode finding first, so reported is True whenever "
        "the layer is in it",
    "bnaudit/rules/modes.py:PredictReliesOnEvalMode.check:const:1 -> 2":
        "next() takes the first of batches[:1] or of batches[:2]: the same batch",
    "bnaudit/rules/running_stats.py:FrozenBNDrifts.check.probe:const:1 -> 2":
        "next() takes the first of batches[:1] or of batches[:2]: the same batch",
    "bnaudit/rules/running_stats.py:FrozenBNDrifts.check:dropcond:res.forward_ran and layer.moved is False -> "
    "(layer.moved is False)":
        "frozen_bn_drift leaves moved None unless its forward ran, so moved is False implies forward_ran",
    "bnaudit/rules/running_stats.py:_model_trained:boolop:and -> or":
        "torch refuses an eval-mode forward of a BatchNorm with only one of running_mean/running_var, and the "
        "audit's graph pass runs one before BN303/BN304 read this: the two are both tensors or both None",
    "bnaudit/rules/running_stats.py:_model_trained:dropcond:isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor) -> (isinstance(rv, torch.Tensor))":
        "torch refuses an eval-mode forward of a BatchNorm with only one of running_mean/running_var, and the "
        "audit's graph pass runs one before BN303/BN304 read this: the two are both tensors or both None",
    "bnaudit/rules/running_stats.py:_model_trained:dropcond:isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor) -> (isinstance(rm, torch.Tensor))":
        "torch refuses an eval-mode forward of a BatchNorm with only one of running_mean/running_var, and the "
        "audit's graph pass runs one before BN303/BN304 read this: the two are both tensors or both None",
    "bnaudit/rules/running_stats.py:_mismatch:boolop:or -> and":
        "layer_fit sets z and r in the same branch: both None or both floats",
    "bnaudit/rules/running_stats.py:TrainEvalGap.check:dropcond:res.train_accuracy is not None and "
    "res.eval_accuracy is not None -> (res.eval_accuracy is not None)":
        "train_eval_gap sets both accuracies under the same condition (metric cross_entropy): both None or both floats",
    "bnaudit/rules/running_stats.py:TrainEvalGap.check:dropcond:res.train_accuracy is not None and "
    "res.eval_accuracy is not None -> (res.train_accuracy is not None)":
        "train_eval_gap sets both accuracies under the same condition (metric cross_entropy): both None or both floats",
    "bnaudit/rules/running_stats.py:TrainEvalGap.check:boolop:and -> or #2":
        "train_eval_gap sets both accuracies under the same condition (metric cross_entropy): both None or both floats",
    "bnaudit/probes/common.py:_varies:const:0 -> 1":
        "read only when numel() > 1; 'an element differs from flat[0]' and 'from flat[1]' both mean 'not all "
        "equal' (a NaN differs from everything under either)",
    "bnaudit/probes/common.py:buffer_hashes:dropcond:b is not None -> True":
        "named_buffers() never yields a None buffer",
    "bnaudit/probes/state.py:ModelState.restore:dropcond:m._buffers.get(name) is not b -> True":
        "storing the saved object again under the name it is already stored under changes nothing",
    "bnaudit/probes/state.py:ModelState.restore:dropcond:m._parameters.get(name) is not p -> True":
        "storing the saved object again under the name it is already stored under changes nothing",
    "bnaudit/probes/state.py:ModelState.restore:dropcond:p.requires_grad != requires_grad -> True":
        "requires_grad_(v) on a parameter (a leaf) whose requires_grad is already v changes nothing",
    #
    # --- the inference, train/eval and eval-step probes, BN4xx (K_PROBES, K_DIST) ---
    "bnaudit/probes/train_eval.py:frozen_bn_drift:dropcond:inputs is not None and (batch_size(inputs) or 0) >= 2 -> "
    "((batch_size(inputs) or 0) >= 2)":
        "batch_size(None) is None (None holds no tensor), so (None or 0) >= 2 is False as the dropped test was",
    "bnaudit/probes/train_eval.py:frozen_bn_drift:const:0 -> 1 #2":
        "(batch_size(inputs) or 1) >= 2: the default replaces only None or 0, and 0 and 1 are both below 2",
    "bnaudit/probes/train_eval.py:frozen_bn_drift:const:1e-5 -> 2e-05":
        "getattr(m, 'eps', 1e-5) on layers from bn_layers(): every torch _BatchNorm sets eps, the default is never read",
    "bnaudit/probes/train_eval.py:frozen_bn_drift:dropcond:nbt0 is not None and nbt1 is not None -> (nbt1 is not None)":
        "both counts come from the same layer's num_batches_tracked: both are None or neither is",
    "bnaudit/probes/train_eval.py:frozen_bn_drift:boolop:and -> or #5":
        "nbt0 and nbt1 are the same layer's num_batches_tracked before and after: both are None or neither is",
    "bnaudit/probes/train_eval.py:FrozenResult:const:0 -> 1 #2":
        "a dataclass default never read: every FrozenResult is built with all four fields",
    "bnaudit/probes/train_eval.py:train_eval_gap:const:0 -> 1":
        "(batch_size(inputs) or 1) < 2: the default replaces only None or 0, and 0 and 1 are both below 2",
    "bnaudit/probes/train_eval.py:train_eval_gap:const:0 -> 1 #3":
        "n = batch_size(...) or 1 replaces only None or 0, and the next line skips n < 2 either way",
    "bnaudit/probes/train_eval.py:train_eval_gap:boolop:or -> and #6":
        "metric is set on the first batch past the shape checks and that batch is always counted (its kind is "
        "metric), so count == 0 exactly when metric is None: (count == 0 and metric is None) == (count == 0)",
    "bnaudit/probes/train_eval.py:_metric_for:dropcond:out.dim() >= 2 and out.is_floating_point() and targets.dim() "
    "== out.dim() - 1 -> (out.is_floating_point()) and (targets.dim() == out.dim() - 1)":
        "below 2 dims the output is 1-D (0-D returned 'output' already), so targets.dim() == 0, whose empty "
        "shape[:1] never matched the output's (N,): 'output' was returned before this line",
    "bnaudit/probes/inference.py:_pool:compare:> -> >=":
        "concat of one part rebuilds it leaf by leaf (torch.cat of the one leaf): the same values, and the pool is "
        "only read through take(), which indexes a copy anyway",
    "bnaudit/probes/inference.py:cobatch_invariance:const:0 -> 1 #2":
        "_pool keeps only inputs with a batch size of at least 1 and concatenates them, so batch_size(pool) is "
        "never None or 0 and the 'or' default is never used",
    "bnaudit/probes/inference.py:cobatch_invariance:const:0 -> 1 #3":
        "_pool keeps only inputs with a batch size of at least 1, so batch_size(pool) is never None or 0",
    "bnaudit/probes/inference.py:_dropout_spy.hook:const:0.0 -> 1.0":
        "the spy sits only on is_dropout() modules, torch's _DropoutNd classes, which all set p",
    "bnaudit/probes/inference.py:predict_train_mode_layers:const:0 -> 1 #2":
        "n = batch_size(inputs) or 1 replaces only None or 0, and the next line returns for n < 2 either way",
    "bnaudit/probes/inference.py:predict_mutations:dropcond:b is not None -> True":
        "named_buffers() never yields a None buffer (Module._named_members skips them)",
    "bnaudit/probes/inference.py:predict_mutations:dropcond:b is not None -> True #2":
        "named_buffers() never yields a None buffer (Module._named_members skips them)",
    "bnaudit/rules/distributed.py:SmallPerDeviceBatch:const:0 -> 1":
        "the world_size default: 0 and 1 both mean one device (world <= 1 returns), and a group ignores the option",
    "bnaudit/probes/inference.py:predict_mutations:dropcond:m is not None and is_batchnorm(m) and "
    "\"num_batches_tracked\" in names -> (is_batchnorm(m)) and (\"num_batches_tracked\" in names)":
        "is_batchnorm(None) is False (an isinstance test), as the dropped 'm is not None' was",
}


@dataclass(frozen=True)
class Mutant:
    file: str
    line: int
    function: str
    op: str
    original: str
    replacement: str
    start: int  # character offsets into the file's text
    end: int
    rule: str | None = None  # code of the rule class the mutant is in, if any
    nth: int = 1  # the n-th mutant with the same file, function, operator and texts

    @property
    def key(self) -> str:
        original, replacement = " ".join(self.original.split()), " ".join(self.replacement.split())
        nth = f" #{self.nth}" if self.nth > 1 else ""
        return f"{self.file}:{self.function}:{self.op}:{original} -> {replacement}{nth}"

    def apply(self, text: str) -> str:
        return text[: self.start] + self.replacement + text[self.end :]


# ----------------------------------------------------------------------------------------------- finding
_SWAP_CMP = {
    ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
    ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.In: ("in", "not in"), ast.NotIn: ("not in", "in"),
    ast.Is: ("is", "is not"), ast.IsNot: ("is not", "is"),
}


class _Offsets:
    def __init__(self, text: str) -> None:
        self.starts = [0]
        for line in text.splitlines(keepends=True):
            self.starts.append(self.starts[-1] + len(line))
        self.text = text

    def __call__(self, line: int, col: int) -> int:
        # ast columns are UTF-8 byte offsets; convert within the line.
        raw = self.text[self.starts[line - 1] : self.starts[line]].encode()
        return self.starts[line - 1] + len(raw[:col].decode())

    def span(self, node: ast.AST) -> tuple[int, int]:
        return self(node.lineno, node.col_offset), self(node.end_lineno, node.end_col_offset)


def _example_factories(tree: ast.Module) -> set[str]:
    """Module-level names used by the rules' valid/invalid cases, and whatever those use in turn."""
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    used: set[str] = set()
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for stmt in cls.body:
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id in ("valid", "invalid")
                                                    for t in stmt.targets):
                used |= {n.id for n in ast.walk(stmt.value) if isinstance(n, ast.Name)}
    todo = [n for n in used if n in defs]
    while todo:
        for n in ast.walk(defs[todo.pop()]):
            if isinstance(n, ast.Name) and n.id in defs and n.id not in used:
                used.add(n.id)
                todo.append(n.id)
    return used & set(defs)


def _skipped_nodes(tree: ast.Module) -> set[int]:
    """ids of nodes never mutated: docstrings, annotations, f-strings, __all__, valid/invalid cases."""
    skip: set[int] = set()

    def drop(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                drop(first)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            drop(node.returns)
            for a in (*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs, node.args.vararg, node.args.kwarg):
                if a is not None:
                    drop(a.annotation)
        if isinstance(node, ast.AnnAssign):
            drop(node.annotation)
        if isinstance(node, ast.JoinedStr):
            drop(node)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in ("__all__", "valid", "invalid")
                                                for t in node.targets):
            drop(node)
    return skip


def find_mutants(path: Path) -> list[Mutant]:
    """Every mutant of one file, in source order."""
    rel = path.resolve().relative_to(ROOT).as_posix()
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    at = _Offsets(text)
    factories = _example_factories(tree)
    skip = _skipped_nodes(tree)
    out: list[Mutant] = []

    rules = {n.name: _rule_code(n) for n in tree.body if isinstance(n, ast.ClassDef)}

    def add(node: ast.AST, function: str, op: str, start: int, end: int, replacement: str) -> None:
        rule = rules.get(function.split(".")[0])
        out.append(Mutant(rel, node.lineno, function, op, text[start:end], replacement, start, end, rule))

    def visit(node: ast.AST, function: str) -> None:
        if id(node) in skip:
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if function == "<module>" and node.name in factories:
                return
            function = node.name if function == "<module>" else f"{function}.{node.name}"
        elif function == "<module>" and not isinstance(node, (ast.Assign, ast.AnnAssign, ast.expr)):
            # module level: only assignments (thresholds, tables) are mutated, not imports or decorators
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.stmt, ast.Assign)):
                    visit(child, function)
            return
        mutate(node, function)
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    def mutate(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.Compare):
            left = node.left
            for op, right in zip(node.ops, node.comparators):
                if type(op) in _SWAP_CMP:
                    a, b = at(left.end_lineno, left.end_col_offset), at(right.lineno, right.col_offset)
                    gap = text[a:b]
                    token, new = _SWAP_CMP[type(op)]
                    i = _find_token(gap, token)
                    if i is not None:
                        add(node, function, "compare", a + i, a + i + len(token), new)
                left = right
        elif isinstance(node, ast.BoolOp):
            token, new = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
            for x, y in zip(node.values, node.values[1:]):
                a, b = at(x.end_lineno, x.end_col_offset), at(y.lineno, y.col_offset)
                i = _find_token(text[a:b], token)
                if i is not None:
                    add(node, function, "boolop", a + i, a + i + len(token), new)
            if isinstance(node.op, ast.And):
                for k in range(len(node.values)):
                    rest = [v for j, v in enumerate(node.values) if j != k]
                    start, end = at.span(node)
                    kept = " and ".join(f"({text[slice(*at.span(v))]})" for v in rest)
                    add(node, function, "dropcond", start, end, kept)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("any", "all"):
            start, end = at.span(node.func)
            add(node, function, "anyall", start, end, "all" if node.func.id == "any" else "any")
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            start, end = at.span(node)
            if isinstance(node.value, int):
                add(node, function, "const", start, end, repr(node.value + 1))
            else:
                add(node, function, "const", start, end, repr(node.value * 2 if node.value else 1.0))
        elif isinstance(node, ast.If) and not isinstance(node.test, ast.Constant):
            start, end = at.span(node.test)
            add(node, function, "dropcond", start, end, "True")
        elif isinstance(node, ast.comprehension):
            for cond in node.ifs:
                start, end = at.span(cond)
                add(cond, function, "dropcond", start, end, "True")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            start, end = at.span(node)
            add(node, function, "dropcond", start, end, f"({text[slice(*at.span(node.operand))]})")

    for stmt in tree.body:
        visit(stmt, "<module>")
    seen: dict[str, int] = {}
    numbered = []
    for m in out:
        try:
            ast.parse(m.apply(text))
        except SyntaxError:  # e.g. a constant that is part of a larger literal; never a real program
            continue
        seen[m.key] = seen.get(m.key, 0) + 1
        numbered.append(replace(m, nth=seen[m.key]))
    return numbered


def _rule_code(cls: ast.ClassDef) -> str | None:
    for stmt in cls.body:
        if (isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "code" for t in stmt.targets)
                and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)):
            return stmt.value.value
    return None


def _find_token(gap: str, token: str) -> int | None:
    """Where the operator ``token`` stands in the text between two operands (skipping brackets and comments)."""
    words = token.split()
    i = 0
    while i < len(gap):
        c = gap[i]
        if c == "#":
            j = gap.find("\n", i)
            i = len(gap) if j < 0 else j
            continue
        if gap.startswith(words[0], i):
            before = gap[i - 1] if i else " "
            j = i + len(words[0])
            if len(words) == 2:
                rest = gap[j:]
                stripped = rest.lstrip()
                if not stripped.startswith(words[1]):
                    i += 1
                    continue
                j += len(rest) - len(stripped) + len(words[1])
            after = gap[j] if j < len(gap) else " "
            is_word = token[0].isalpha()
            whole = not is_word or (not (before.isalnum() or before == "_") and not (after.isalnum() or after == "_"))
            # "<" must not be the start of "<=" (and so on) when the token is the shorter one
            if whole and (is_word or not (after in "=" and token in ("<", ">", "="))):
                if words == ["in"] and gap[:i].rstrip().endswith("not"):
                    i += 1
                    continue
                if words == ["is"] and gap[j:].lstrip().startswith("not"):
                    i += 1
                    continue
                return i
        i += 1
    return None


# ----------------------------------------------------------------------------------------------- running
@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed | timeout | survived | equivalent | error
    seconds: float
    detail: str = ""


# Each pytest runs in a process forked from one that has already imported torch, numpy, pytest and the other
# heavy third-party modules (never bnaudit: the child imports the worker's mutated copy). Importing them took
# 3-5 s of every pytest run on the 2-core machine, more than many mutants' tests.
_PRELOAD = ["torch", "numpy", "scipy.stats", "sklearn.datasets", "pytest", "hypothesis", "yaml", "typer", "rich"]
_FORK = None
_LIVE: set = set()  # the pytest processes running now, killed on Ctrl-C


def _fork_context():
    global _FORK
    if _FORK is None:
        import multiprocessing

        _FORK = multiprocessing.get_context("forkserver")
        _FORK.set_forkserver_preload(_PRELOAD)
    return _FORK


def _pytest_child(cwd: str, args: list[str], log: str) -> None:
    os.setpgrp()  # its own process group, so a timeout kills what the tests started too
    os.chdir(cwd)
    sys.path.insert(0, cwd)
    sys.dont_write_bytecode = True
    os.environ.update(PYTHONPATH=cwd, PYTHONDONTWRITEBYTECODE="1")  # for the processes the tests start
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import pytest

    code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *args])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.join()


def _pytest(cwd: Path, args: list[str], timeout: float) -> tuple[int | None, str, float]:
    log = cwd / ".mutation-pytest.log"
    t0 = time.monotonic()
    proc = _fork_context().Process(target=_pytest_child, args=(str(cwd), args, str(log)))
    proc.start()
    _LIVE.add(proc)
    try:
        proc.join(timeout)
    finally:
        if proc.exitcode is None:
            _kill(proc)
        _LIVE.discard(proc)
    if proc.exitcode is not None and proc.exitcode < 0:  # killed: a timeout (or Ctrl-C)
        return None, "", time.monotonic() - t0
    tail = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return proc.exitcode, tail[-1] if tail else "", time.monotonic() - t0


def test_commands(file: str) -> list[list[str]]:
    commands = TESTS.get(file)
    if commands is None:
        raise SystemExit(f"no fast tests known for {file}; add it to TESTS in {Path(__file__).name}")
    return [list(cmd) for cmd in commands]


def staged_commands(m: Mutant) -> list[list[str]]:
    """A mutant inside a rule class meets that rule's own tests first (its examples, then unit tests named
    after it, ``test_bn301_*``): most mutants die there in seconds. Only a survivor of those runs the module's
    full set, so the verdict is the full set's."""
    staged = []
    if m.rule:
        units = sorted({a for cmd in test_commands(m.file) for a in cmd if a.endswith(".py") and a != EXAMPLES})
        staged = [[EXAMPLES, "-k", m.rule]] if m.rule < "BN4" else []
        staged += [[*units, "-k", m.rule.lower()]] if units else []
    return staged + test_commands(m.file)


def _copy_repo(dest: Path) -> Path:
    """The repository's files (tracked, or new and not ignored), as the tests see them in a checkout."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def run(mutants: list[Mutant], jobs: int, timeout_factor: float, verbose: bool,
        timeout: float | None = None) -> list[Outcome]:
    files = sorted({m.file for m in mutants})
    for f in files:  # every module has its tests named before anything runs
        test_commands(f)
    base_dir = Path(tempfile.mkdtemp(prefix="bnaudit-mutation-"))
    workers = [_copy_repo(base_dir / f"w{i}") for i in range(jobs)]
    try:
        # Baseline: each module's tests must pass unmutated, and their time sets the timeout.
        budget: dict[str, float] = {}
        for f in files:
            if timeout is not None:  # the caller vouches that the tests pass unmutated
                budget[f] = timeout
                continue
            total = 0.0
            for cmd in test_commands(f):
                rc, tail, secs = _pytest(workers[0], cmd, timeout=900)
                if rc != 0:
                    raise SystemExit(f"the tests for {f} fail without any mutant ({' '.join(cmd)}): {tail}")
                total += secs
            budget[f] = total * timeout_factor + 20
            print(f"baseline {f}: {total:.0f}s of tests; timeout {budget[f]:.0f}s per mutant", flush=True)
        originals = {f: (ROOT / f).read_text(encoding="utf-8") for f in files}
        free = list(workers)
        outcomes: list[Outcome] = []

        def one(m: Mutant) -> Outcome:
            w = free.pop()
            target = w / m.file
            try:
                target.write_text(m.apply(originals[m.file]), encoding="utf-8")
                t0 = time.monotonic()
                status, detail = "survived", ""
                for cmd in staged_commands(m):
                    rc, tail, _ = _pytest(w, cmd, timeout=budget[m.file])
                    if rc == 5:  # no test matched the rule's name: nothing ran, nothing killed
                        continue
                    if rc is None:
                        status, detail = "timeout", " ".join(cmd)
                        break
                    if rc != 0:
                        status, detail = "killed", tail
                        break
                if status == "survived" and m.key in EQUIVALENT:
                    status, detail = "equivalent", EQUIVALENT[m.key]
                return Outcome(m, status, time.monotonic() - t0, detail)
            finally:
                target.write_text(originals[m.file], encoding="utf-8")
                free.append(w)

        # One job runs in this thread, so that Ctrl-C interrupts its wait and the running pytests are killed.
        pool = ThreadPoolExecutor(max_workers=jobs)
        try:
            for i, o in enumerate(pool.map(one, mutants) if jobs > 1 else map(one, mutants), 1):
                outcomes.append(o)
                if verbose or o.status == "survived":
                    print(f"[{i}/{len(mutants)}] {o.status:10s} {o.mutant.file}:{o.mutant.line} ({o.mutant.function}) "
                          f"{o.mutant.op}: {o.mutant.original!r} -> {o.mutant.replacement!r}", flush=True)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: report what finished (the running pytest is killed)
            print(f"interrupted after {len(outcomes)} of {len(mutants)} mutants; the summary covers those", flush=True)
            for proc in list(_LIVE):
                _kill(proc)
            pool.shutdown(wait=False, cancel_futures=True)
        else:
            pool.shutdown()
        return outcomes
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


def summarize(outcomes: list[Outcome]) -> tuple[str, float]:
    by_file: dict[str, dict[str, int]] = {}
    for o in outcomes:
        by_file.setdefault(o.mutant.file, {}).setdefault(o.status, 0)
        by_file[o.mutant.file][o.status] += 1
    lines = [f"{'module':34s} {'mutants':>7s} {'killed':>6s} {'timeout':>7s} {'equiv':>5s} {'survived':>8s}"]
    for f, c in sorted(by_file.items()):
        n = sum(c.values())
        lines.append(f"{f:34s} {n:7d} {c.get('killed', 0):6d} {c.get('timeout', 0):7d} {c.get('equivalent', 0):5d} "
                     f"{c.get('survived', 0):8d}")
    total = len(outcomes)
    survived = sum(o.status == "survived" for o in outcomes)
    equivalent = sum(o.status == "equivalent" for o in outcomes)
    judged = total - equivalent
    frac = survived / judged if judged else 0.0
    lines.append(f"survived {survived} of {judged} non-equivalent mutants ({frac:.1%}); {equivalent} equivalent")
    if survived:
        lines.append("survivors:")
        lines += [f"  {o.mutant.key}  (line {o.mutant.line})" for o in outcomes if o.status == "survived"]
    if equivalent:
        lines.append("equivalent (see EQUIVALENT in tools/mutation.py):")
        lines += [f"  {o.mutant.key}: {o.detail}" for o in outcomes if o.status == "equivalent"]
    return "\n".join(lines), frac


def _collect(paths: list[str]) -> Iterator[Path]:
    for p in paths:
        path = (ROOT / p).resolve()
        if path.is_dir():
            yield from (f for f in sorted(path.glob("*.py")) if f.name not in SKIP_FILES)
        else:
            yield path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=list(DEFAULT_PATHS), help="files or folders to mutate")
    parser.add_argument("--sample", type=int, help="run a random sample of this many mutants")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (each in its own copy)")
    parser.add_argument("--timeout-factor", type=float, default=3.0, help="timeout = factor x baseline + 20 s")
    parser.add_argument("--timeout", type=float, help="seconds per mutant; skips the unmutated baseline run")
    parser.add_argument("--only", action="append", default=[], help="keep mutants whose key contains this text")
    parser.add_argument("--keys", type=Path, help="keep the mutants whose keys are listed in this file, one a line")
    parser.add_argument("--list", action="store_true", help="print the mutants and stop")
    parser.add_argument("--json", type=Path, help="write every outcome to this file")
    parser.add_argument("--resume", type=Path, help="a --json file of an earlier run: keep its kills, run the rest")
    parser.add_argument("--report", type=Path, help="summarize a --json file of an earlier run and stop")
    parser.add_argument("--max-survival", type=float, default=0.10, help="fail above this surviving fraction")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every outcome, not only survivors")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` ends like Ctrl-C, with a summary

    if args.report:  # summarize a saved run again, with the EQUIVALENT list as it is now
        saved = json.loads(args.report.read_text())
        fields = {f for f in Mutant.__dataclass_fields__}
        outcomes = []
        for d in saved:
            m = Mutant(**{k: v for k, v in d.items() if k in fields})
            status = "equivalent" if d["status"] in ("survived", "equivalent") and m.key in EQUIVALENT else d["status"]
            if status == "equivalent" and d["status"] == "equivalent" and m.key not in EQUIVALENT:
                status = "survived"
            outcomes.append(Outcome(m, status, d["seconds"], EQUIVALENT.get(m.key, d["detail"])))
        report, frac = summarize(outcomes)
        print(report)
        return 0 if frac < args.max_survival else 1

    mutants = [m for f in _collect(args.paths) for m in find_mutants(f)]
    done: list[Outcome] = []
    if args.resume:  # keep an earlier run's kills; run its survivors again (new tests may kill them) and the rest
        saved = {d["key"]: d for d in json.loads(args.resume.read_text())}
        keep = {k for k, d in saved.items() if d["status"] in ("killed", "timeout")}
        done = [Outcome(m, saved[m.key]["status"], saved[m.key]["seconds"], saved[m.key]["detail"])
                for m in mutants if m.key in keep]
    total = len(mutants)
    if args.sample and args.sample < total:
        # Run in random order: a run stopped early (Ctrl-C) is still a random sample of every module.
        mutants = random.Random(args.seed).sample(mutants, args.sample)
    if args.only:  # after sampling, so that --only narrows a sample instead of drawing another
        mutants = [m for m in mutants if any(s in m.key for s in args.only)]
    if args.keys:  # exact keys (e.g. an earlier run's survivors); `--only` would also match "... #2" for "..."
        wanted = {line.strip() for line in args.keys.read_text().splitlines() if line.strip()}
        missing = wanted - {m.key for m in mutants}
        if missing:
            print(f"{len(missing)} listed key(s) match no mutant of the code as it is now:", *sorted(missing), sep="\n  ")
        mutants = [m for m in mutants if m.key in wanted]
    if args.list:
        for m in mutants:
            print(f"{m.file}:{m.line} ({m.function}) {m.op}: {m.original!r} -> {m.replacement!r}")
        print(f"{len(mutants)} of {total} mutants")
        return 0
    kept = {o.mutant.key for o in done}
    done = [o for o in done if o.mutant in mutants]
    mutants = [m for m in mutants if m.key not in kept]
    print(f"running {len(mutants)} of {total} mutants" + (f" (sample, seed {args.seed})" if args.sample else "")
          + (f"; {len(done)} kills kept from {args.resume}" if args.resume else ""), flush=True)
    t0 = time.monotonic()
    outcomes = done + run(mutants, args.jobs, args.timeout_factor, args.verbose, args.timeout)
    report, frac = summarize(outcomes)
    print(report)
    print(f"took {time.monotonic() - t0:.0f}s")
    if args.json:
        args.json.write_text(json.dumps([{**asdict(o.mutant), "key": o.mutant.key, "status": o.status,
                                          "seconds": round(o.seconds, 1), "detail": o.detail} for o in outcomes],
                                        indent=1))
    return 0 if frac < args.max_survival else 1


if __name__ == "__main__":
    sys.exit(main())

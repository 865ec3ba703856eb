"""The evaluation the ``rw_*`` training scripts share, as a project keeps its own ``engine.py``: eval mode,
autograd off, accuracy over a loader. Each script calls model.train() itself before training again."""

import contextlib

import torch


def evaluate(model, loader, *, inference=False, autocast=False, prepare=None):
    """Accuracy of ``model`` over ``loader`` in eval mode, under torch.no_grad() (or torch.inference_mode())."""
    model.eval()
    grad_off = torch.inference_mode() if inference else torch.no_grad()
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    correct = 0
    with grad_off, cast:
        for x, y in loader:
            out = model(prepare(x) if prepare else x)
            out = out[0] if isinstance(out, tuple) else out
            correct += (out.argmax(1) == y).sum().item()
    return correct / len(loader.dataset)

"""Knowledge distillation: a teacher trained briefly, then frozen in eval mode and run under torch.no_grad()
at every step, while a smaller student learns from its softened outputs."""

import argparse

import torch
from digits import BNMLP, loaders
from rw_common import evaluate
from torch import nn


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--temperature", type=float, default=2.0)
    args = p.parse_args()
    torch.manual_seed(0)
    train, val = loaders(batch_size=64)
    teacher = BNMLP(hidden=64)
    topt = torch.optim.SGD(teacher.parameters(), lr=0.1, momentum=0.9)
    teacher.train()
    for x, y in train:
        topt.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        topt.step()
    teacher.eval()
    teacher.requires_grad_(False)
    student = BNMLP(hidden=16)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    t = args.temperature
    for _ in range(args.epochs):
        student.train()
        for x, y in train:
            with torch.no_grad():
                soft = (teacher(x) / t).softmax(1)
            logits = student(x)
            kd = nn.functional.kl_div((logits / t).log_softmax(1), soft, reduction="batchmean") * t * t
            loss = 0.5 * kd + 0.5 * nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"student val accuracy {evaluate(student, val):.3f}")


if __name__ == "__main__":
    main()

"""Digits Fréchet distance of the real data, the teacher, a random student and a distilled student.

Prints one JSON object. All generated sets are sampled with the same sampler, steps and seed.
Fréchet distance depends on the sample count, so each row gives two figures:

* ``digits_fd``: all ``--num`` samples against all 1797 real digits (what ``dkdm eval`` reports);
* ``digits_fd_vs_half``: the first 898 samples against a held-out random half of the real digits,
  directly comparable with ``real_half_vs_half`` (the other half against it): the floor that a
  perfect generator reaches at this sample size.

    python bench/digits_reference.py --student runs/digits-dkdm [--num 1797]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dkdm_core.checkpoint import load_model
from dkdm_core.data import load_digits_tensor
from dkdm_core.metrics import classifier_outputs, feature_statistics, frechet_distance
from dkdm_core.models import build_model, count_parameters
from dkdm_core.sampling import generate, sampling_diffusion
from services.evaluation import digits_evaluator, load_classifier, resolve_path


class HalfSplit:
    """A random half A of the real digits and the feature statistics of the other half B."""

    def __init__(self, seed: int) -> None:
        images = load_digits_tensor()[0]
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
        self.half = images.shape[0] // 2
        self.classifier = load_classifier()
        self.real_a = images[order[: self.half]]
        self.stats_b = self.stats(images[order[self.half :]])

    def stats(self, images: torch.Tensor):
        return feature_statistics(classifier_outputs(self.classifier, images)[0])

    def fd(self, images: torch.Tensor) -> float:
        return frechet_distance(*self.stats(images[: self.half]), *self.stats_b)


def score(model: torch.nn.Module, card, args: argparse.Namespace, split: HalfSplit) -> dict[str, float]:
    diffusion = sampling_diffusion(card.diffusion, card.learn_sigma, args.steps, args.sampler)
    start = time.perf_counter()
    samples = generate(model, diffusion, card.sample_shape, args.num, args.seed, args.sampler)
    seconds = (time.perf_counter() - start) / args.num
    return {
        **digits_evaluator().evaluate(samples),
        "digits_fd_vs_half": split.fd(samples),
        "seconds_per_image": seconds,
        "parameters": float(count_parameters(model)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="assets/teachers/digits")
    parser.add_argument("--student", help="a distilled student's model folder")
    parser.add_argument("--random-arch", default="unet-tiny", help="architecture of the untrained student")
    parser.add_argument("--num", type=int, default=1797)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", choices=["iddpm", "ddim"], default="iddpm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.num < 898:
        parser.error("--num must be at least 898 (half the real digits)")
    split = HalfSplit(args.seed)
    teacher, card = load_model(resolve_path(args.teacher))
    torch.manual_seed(args.seed)
    random_student = build_model(args.random_arch, card.channels, card.image_size, card.learn_sigma).eval()
    result: dict[str, object] = {
        "num_samples": args.num,
        "sampler": f"{args.sampler}-{args.steps}",
        "real_half_vs_half": {"digits_fd_vs_half": split.fd(split.real_a)},
        "teacher": score(teacher, card, args, split),
        "random_student": score(random_student, card, args, split),
    }
    if args.student:
        student, student_card = load_model(args.student)
        result["student"] = {**score(student, student_card, args, split), "arch": student_card.arch}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

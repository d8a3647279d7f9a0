"""EWC's penalty scale on a finished run: how large `½ Σ F (θ − θ*)²` grew under plain fine-tuning (for `ewc_lambda`).

The Fisher is the `ewc` arm's first anchor (the seed's aligned model with its fresh LoRA, on a seeded sample of the
align rows); θ is each stage's adapter of the `--arm` arm (default `full`). Each line gives the penalty at λ = 1, the
stage's training loss, and the λ at which the penalty would equal that loss:

    python bench/ewc_scale.py recipes/testbed-smollm2.yaml runs/testbed-smollm2 --seed 0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path, help="the recipe file the run was made with (it has an `align:` stage)")
    parser.add_argument("run", type=Path, help="the run folder, with the seed's align stage and the arm's stages")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arm", default="full", help="the arm whose adapters are measured (default: full)")
    parser.add_argument("--fisher-rows", type=int, default=None, help="default: the recipe's `ewc` arm's fisher_rows")
    args = parser.parse_args(argv)

    import json

    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from gradsift.continual import backends, load_recipe
    from gradsift.continual.arms import fisher_sample
    from gradsift.continual.layout import RunLayout
    from gradsift.continual.penalties import anchor_here, ewc_penalty
    from gradsift.continual.rows import align_records
    from gradsift.continual.schema import ArmSpec

    recipe = load_recipe(args.recipe)
    if recipe.align is None:
        print(f"{args.recipe}: the recipe has no align stage to anchor at", file=sys.stderr)
        return 2
    rows = args.fisher_rows or (recipe.arm("ewc") if "ewc" in recipe.arms else ArmSpec(kind="ewc")).fisher_rows
    layout = RunLayout(args.run)
    model = backends.fresh_lora(recipe, backends.load_base(recipe, str(layout.aligned_model(args.seed))), args.seed)
    records = align_records(recipe, args.seed)
    start = time.perf_counter()
    sample = fisher_sample(records, rows, args.seed)
    anchor = anchor_here(
        model, "00-align", sample, backends.tokenizer(recipe), recipe.train_for(recipe.align).max_length
    )
    from gradsift.hardware import machine_line

    print(f"{machine_line()}: fisher_rows={anchor.rows} fisher_seconds={time.perf_counter() - start:.1f}")
    for part in ("lora_A", "lora_B"):
        values = torch.cat([value.flatten() for key, value in anchor.fisher.items() if part in key])
        print(f"fisher_{part}_mean={float(values.mean()):.3g} fisher_{part}_max={float(values.max()):.3g}")
    for index, stage in enumerate(recipe.stages, start=1):
        folder = layout.stage_dir(args.seed, args.arm, index, stage.name)
        set_peft_model_state_dict(model, load_file(str(RunLayout.adapter(folder) / "adapter_model.safetensors")))
        loss = json.loads(RunLayout.stage_file(folder).read_text())["train"]["train_loss"]
        with torch.no_grad():
            penalty = float(ewc_penalty(model, [anchor], 1.0))
        equal = loss / penalty if penalty > 0 else float("inf")
        print(
            f"stage={folder.name} penalty_at_lambda1={penalty:.3e} train_loss={loss:.3f} lambda_for_equal={equal:.3g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate a checkpoint, an official UNITER file or an official-format score file on
Winoground (or the synthetic world's Winoground-format set, the default input).

    python eval_winoground.py ckpt_path=outputs/<date>/<time>/checkpoints/best-stepN.ckpt
    python eval_winoground.py data=flickr30k model=uniter_base model.checkpoint=uniter-base.pt head=itm
    python eval_winoground.py scorer=file scores=clip_scores.jsonl examples=data/winoground/examples.jsonl
    torchrun --nproc_per_node 8 eval_winoground.py ckpt_path=...   # same numbers, 8 GPUs

All logic lives in cacr.evaluation.cli.run_winoground; see conf/winoground.yaml for every option.
"""
import hydra
from omegaconf import DictConfig

from cacr.outputs import register_output_dir_resolver

register_output_dir_resolver()  # before Hydra resolves the output directory


@hydra.main(config_path="conf", config_name="winoground", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from cacr.evaluation.cli import guarded, run_winoground

    guarded("eval_winoground.py", run_winoground, cfg)


if __name__ == "__main__":
    main()

"""Evaluate a checkpoint or an official UNITER file on compositional multiple-choice sets:
ARO (VG-Relation, VG-Attribution, COCO/Flickr30k order), SugarCrepe and VALSE in their
public formats, or the synthetic world's set (the default input).

    python eval_multiple_choice.py ckpt_path=outputs/<date>/<time>/checkpoints/best-stepN.ckpt
    python eval_multiple_choice.py data=flickr30k model=uniter_base model.checkpoint=uniter-base.pt head=itm \
        +sets.sugarcrepe='data/sugarcrepe/*.json' regions=data/coco_val2017_regions.h5
    torchrun --nproc_per_node 8 eval_multiple_choice.py ckpt_path=...   # same numbers, 8 GPUs

All logic lives in cacr.evaluation.multiple_choice.run_multiple_choice; see
conf/multiple_choice.yaml for every option.
"""
import hydra
from omegaconf import DictConfig

from cacr.outputs import register_output_dir_resolver

register_output_dir_resolver()  # before Hydra resolves the output directory


@hydra.main(config_path="conf", config_name="multiple_choice", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from cacr.evaluation.cli import guarded
    from cacr.evaluation.multiple_choice import run_multiple_choice

    guarded("eval_multiple_choice.py", run_multiple_choice, cfg)


if __name__ == "__main__":
    main()

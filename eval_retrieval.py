"""Image-text retrieval recalls (docs/reference.md §6) of a checkpoint on a split of the data config, or
recomputed from a saved score matrix without the model.

    python eval_retrieval.py ckpt_path=outputs/<date>/<time>/checkpoints/best-stepN.ckpt
    python eval_retrieval.py ckpt_path=... data=flickr30k split=test save_scores=f30k_test.pt
    python eval_retrieval.py scores=f30k_test.pt
    torchrun --nproc_per_node 8 eval_retrieval.py data=flickr30k ckpt_path=...   # same numbers

All logic lives in cacr.evaluation.cli.run_retrieval; see conf/retrieval.yaml for every option.
"""
import hydra
from omegaconf import DictConfig

from cacr.outputs import register_output_dir_resolver

register_output_dir_resolver()  # before Hydra resolves the output directory


@hydra.main(config_path="conf", config_name="retrieval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from cacr.evaluation.cli import guarded, run_retrieval

    guarded("eval_retrieval.py", run_retrieval, cfg)


if __name__ == "__main__":
    main()

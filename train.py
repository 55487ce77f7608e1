"""Fine-tune UNITER for image-text matching with CACR, IAIS or no regularizer.

    python train.py                                   # CACR on the synthetic world, CPU
    python train.py loss=iais_singular seed=1
    python train.py experiment=cacr_base trainer=gpu  # the paper's setting (real data)
    python train.py -m loss=cacr,iais_singular,none seed=0,1,2

All logic lives in cacr.train.run; see conf/train.yaml for every option.
"""
import hydra
from omegaconf import DictConfig

from cacr.config import register_resolvers

register_resolvers()  # before Hydra resolves the run and sweep directory names


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from cacr.train import main_entry

    main_entry(cfg)


if __name__ == "__main__":
    main()

"""Fine-tune UNITER for image-text matching with CACR, IAIS or no regularizer.

Not built yet: the training pipeline (LightningModule, datamodule, Hydra configs) lands
with the training issue. This entry point says so instead of pretending to train.
"""
import sys

if __name__ == "__main__":
    sys.exit(
        "train.py: training is not built yet (needs the data module, the LightningModule and "
        "conf/train.yaml). Available now: the UNITER model in cacr.model; see README.md."
    )

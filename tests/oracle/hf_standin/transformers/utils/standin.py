"""TEST STAND-IN: which transformers conventions the stand-in follows - NOT transformers' code.

STYLE 4, the 4.5x conventions: a config keeps rope_theta (and rope_scaling) as attributes, a
rope_parameters keyword is kept as an unused attribute, the rotary embedding reads
config.rope_theta; generate() passes cache_position (and position_ids) to the model.
STYLE 5, the 5.x conventions: a config keeps its RoPE settings in the rope_parameters dict
(rope_theta / rope_scaling keywords are converted into it, rope_scaling reads the same dict,
there is no rope_theta attribute) and the rotary embedding reads rope_parameters["rope_theta"];
generate() builds position_ids from the attention mask up front and passes no cache_position.

Chosen at import by the environment variable KVT_HF_STANDIN_STYLE (4 or 5, default 5), and
switchable with transformers.set_standin_style(); a config remembers the style it was built
under."""
import os

VERSIONS = {4: "4.56.0-standin", 5: "5.17.0-standin"}


def _style_from_env():
    v = os.environ.get("KVT_HF_STANDIN_STYLE", "5").strip() or "5"
    if v not in ("4", "5"):
        raise ValueError("KVT_HF_STANDIN_STYLE must be 4 or 5, not %r" % v)
    return int(v)


STYLE = _style_from_env()

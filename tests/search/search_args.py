"""Command-line arguments of the search tests."""

# Tiny settings: phantom at 32 px, 240 images, a timm test model, 2 epochs.
TINY = ["experiment=smoke", "runtime=inline", "data.n=240", "train.max_steps=6", "train.ckpt_every=3",
        "train.sample_every=null", "classify.epochs=2", "progress=false"]
# The pseudo-label space on TINY: a small pool pseudo-labelled at t >= 0.1 (tiny models are not confident).
PSEUDO = ["search=pseudo_label", *TINY, "search.pool_n=24", "search.params.threshold.low=0.1",
          "search.baseline=false"]

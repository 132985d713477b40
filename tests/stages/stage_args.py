"""Command-line arguments of the stage tests: even smaller than experiment=smoke."""

TINY = ["experiment=smoke", "runtime=inline", "data.n=240", "train.max_steps=6", "train.ckpt_every=3",
        "train.sample_every=null", "classify.epochs=2", "progress=false"]
TRAIN = [*TINY, "classify.epochs=1"]
GEN = ["experiment=smoke", "runtime=inline", "data.n=240", "progress=false", "generate.shard_size=16",
       "generate.batch_size=8", "--classes", "edema,hernia"]

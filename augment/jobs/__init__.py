"""Work units below the stages: training a model, one classifier seed, one generate shard, mask scoring."""

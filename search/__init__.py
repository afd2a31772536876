"""Hyper-parameter search of GroupIM with Ray Tune: experiments, trainable, results."""

"""Train many sparse autoencoders in lockstep from an actcache store and export them for SAELens."""

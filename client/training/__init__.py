"""Local DP training (Opacus and fedrad's ghost-clipping engine), prediction and explanations."""

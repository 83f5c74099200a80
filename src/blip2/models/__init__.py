"""The BLIP-2 figure: image encoder -> Q-Former -> projection -> language model, and the stage-1 heads."""

"""The demo world: synthetic scenes, the recipe that trains the shipped demo model, and its evaluation."""

"""Applications built on the library: the CLI, the demo and its assets. `import blip2` imports none of them."""

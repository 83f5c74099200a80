"""Runtime backends: device-specific fast paths that models never import."""

"""Code every chapter shares: settings, device, base model, progress bars, guard primitives, the
chapter manifests, the reference facts, the pre-flight check."""

"""The machinery written once for every method: configs, registry, targeting, injection,
lifecycle, state and accounting. Imports only torch (and safetensors)."""

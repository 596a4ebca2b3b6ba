"""Imports every module that registers a task in `core.registry` (add new method tasks here)."""
from core import flow_task  # noqa: F401
from relay_jax import task as relay_task  # noqa: F401
from flowrl import task as flowrl_task  # noqa: F401
from decoders import autoencoder  # noqa: F401
from decoders import task as pid_task  # noqa: F401
from decoders import latent_flow  # noqa: F401
from decoders import distill  # noqa: F401
from sr import autoencoding  # noqa: F401
from sr import prior  # noqa: F401
from sr import onestep  # noqa: F401

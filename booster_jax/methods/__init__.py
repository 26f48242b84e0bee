"""Training methods; importing this package registers the built-in ones (see ``base.register``)."""

from booster_jax.methods import booster, booster_vaccine, lisa, repnoise, sft, vaccine  # noqa: F401

"""Image generation: the ``gan`` task (alternating discriminator/generator steps, EMA generator, sample grids,
Frechet distances on our own features), the DCGAN-style baseline generator and the discriminator."""

from vitkit.tasks.generation.fid import ClassifierFeatures, PixelFeatures, classifier_features, frechet_distance
from vitkit.tasks.generation.models import DCGANGenerator, GanPair, SNDiscriminator
from vitkit.tasks.generation.task import GanTask, discriminator_loss, generator_loss, image_grid

__all__ = [
    "ClassifierFeatures",
    "DCGANGenerator",
    "GanPair",
    "GanTask",
    "PixelFeatures",
    "SNDiscriminator",
    "classifier_features",
    "discriminator_loss",
    "frechet_distance",
    "generator_loss",
    "image_grid",
]

"""qat: quantization-aware training for PyTorch.

    import qat
    recipe = qat.Recipe.from_yaml("configs/recipe/w4a8.yaml")
    print(qat.plan(model, recipe))
    model = qat.prepare(model, recipe)
    ...train...
    int_model = qat.convert(model)
    qat.save(int_model, "out/model")
    int_model = qat.load("out/model")
"""

from qat.api import plan, prepare
from qat.export import convert, load, save
from qat.export.families import FAMILIES, shipped
from qat.quant import QuantSpec, Recipe
from qat.quant.family import Families, LayerFamily

__version__ = "0.1.0"

__all__ = ["FAMILIES", "Families", "LayerFamily", "QuantSpec", "Recipe", "__version__",
           "convert", "load", "plan", "prepare", "save", "shipped"]  # fmt: skip

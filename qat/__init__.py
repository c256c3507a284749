"""qat: quantization-aware training for PyTorch.

    import qat
    recipe = qat.Recipe.from_yaml("configs/recipe/w4a8.yaml")
    print(qat.plan(model, recipe))
    model = qat.prepare(model, recipe)
"""

from qat.quant import QuantSpec, Recipe, plan, prepare

__version__ = "0.1.0"

__all__ = ["QuantSpec", "Recipe", "__version__", "plan", "prepare"]

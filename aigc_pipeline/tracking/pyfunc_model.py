"""MLflow models-from-code entry point: ``log_model(python_model=<this file>)`` copies this file
into the model instead of cloudpickling an object, so loading a model never unpickles code."""

from mlflow.models import set_model

from aigc_pipeline.tracking.pyfunc import GeneratorModel

set_model(GeneratorModel())

"""The code MLflow stores with every Persona adapter model (models-from-code: the model is set here by
`mlflow.models.set_model`, nothing is pickled). The pyfunc itself is `training.pyfunc.PersonaModel`."""
import mlflow.models

from training.pyfunc import PersonaModel

mlflow.models.set_model(PersonaModel())

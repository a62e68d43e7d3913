# MLflow tracking server with the PostgreSQL driver and the S3 client (infra/k8s/mlflow.yaml).
# [auth]: the basic-auth app (Flask-WTF); psycopg 3 is SQLAlchemy 2.1's driver for postgresql:// URIs; the pins are the ones tests/test_team_mlflow.py runs.
#   docker build -f infra/mlflow.Dockerfile -t registry.example.com/persona-mlflow:3.17.2 infra
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN pip install 'mlflow[auth]==3.17.2' sqlalchemy==2.1.9 'psycopg[binary]==3.3.9' boto3==1.44.5
EXPOSE 5000
ENTRYPOINT ["mlflow"]

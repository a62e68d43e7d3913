# MLflow tracking server with the Postgres driver and the S3 client (infra/k8s/mlflow.yaml).
#   docker build -f infra/mlflow.Dockerfile -t registry.example.com/persona-mlflow:3.17.2 infra
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN pip install mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.5
EXPOSE 5000
ENTRYPOINT ["mlflow"]

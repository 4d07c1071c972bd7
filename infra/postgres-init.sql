-- Runs once, when the Postgres volume is first created: MLflow's database beside Prefect's (POSTGRES_DB).
CREATE DATABASE mlflow;

# A CPU image that serves a tiny test model on the mocker engine: the README's commands.
#   docker build -t kvflow . && docker run -p 8000:8000 kvflow
# Mount a model directory and change the command to serve your own.
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install .
RUN kvflow make-test-model models/tiny
EXPOSE 8000
CMD ["kvflow", "run", "in=http", "out=mocker", "--model-path", "models/tiny", "--http-host", "0.0.0.0"]

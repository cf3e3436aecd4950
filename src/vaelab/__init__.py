"""vaelab: tracked variational autoencoders on MNIST, a DVC pipeline logged to MLflow."""

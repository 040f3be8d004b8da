"""medinfer.federated"""

//! The client side: requests to one upstream registry.

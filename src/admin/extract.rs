//! A JSON body extractor whose rejections are our JSON errors, not axum's plain text.

use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use super::error::AdminError;

pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = AdminError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(JsonBody(v)),
            Err(rejection) => Err(AdminError::BadRequest(rejection.body_text())),
        }
    }
}

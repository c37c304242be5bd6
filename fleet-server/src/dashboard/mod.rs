//! The operator dashboard (issue #14): server-rendered HTML (maud) at `/`,
//! on the API's port, behind an operator login; charts drawn by uPlot
//! (vendored under `assets/`, served from the binary, so the page works
//! offline); no JavaScript build step.
//!
//! Routes (every page but `/login` needs the session cookie; without it a
//! `GET` is redirected to `/login` and anything else refused with 403):
//!
//! | route | what |
//! |---|---|
//! | `GET /login`, `POST /login` | the operator token (same as the API's bearer token) -> session cookie |
//! | `GET /login/once/{code}` | one-time login link (`edgefleet demo` prints one): a page whose button posts it |
//! | `POST /login/once/{code}` | redeems the code (once, within 15 minutes) and starts a session |
//! | `POST /logout` | ends the session |
//! | `GET /` | fleet: device counts by state, releases per group and target (rolled out vs running), devices needing attention |
//! | `GET /devices?q=&group=&target=&state=&page=` | device list, filtered, 50 per page |
//! | `GET /devices/{id}` | identity, releases, update outcomes, latency and request-rate charts, drift per feature against its threshold, captured data |
//! | `GET /rollouts`, `GET /rollouts/{id}?page=` | waves, gate, halt reason, per-device outcomes; pause / resume / abort |
//! | `POST /rollouts/{id}/{pause,resume,abort}` | the controls (CSRF token required) |
//! | `GET /drift?group=` | per group, statistic/threshold over time per device; retraining requests with evidence |
//! | `GET /bundles` | models, releases, targets, sizes |
//! | `GET /assets/*` | uPlot, its CSS, `dashboard.js`, `dashboard.css` |
//!
//! Every response carries a Content-Security-Policy allowing only this
//! origin's scripts and styles, and refuses framing. Every form post is
//! checked for the session's CSRF token ([`session`]) and, when the browser
//! sends one, an `Origin` equal to the request's `Host`.

mod loop_pages;
mod render;
pub mod session;
mod views;

use std::sync::Arc;

use axum::extract::{Form, Path, Query, Request, State as AxState};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::State;
use session::{CsrfToken, SessionId};

type S = AxState<Arc<State>>;

/// The dashboard's routes (merged into [`crate::app`]).
pub fn router(state: Arc<State>) -> Router<Arc<State>> {
    let pages = Router::new()
        .route("/", get(fleet))
        .route("/devices", get(devices))
        .route("/devices/{id}", get(device))
        .route("/rollouts", get(rollouts))
        .route("/rollouts/{id}", get(rollout))
        .route("/rollouts/{id}/{action}", post(control_rollout))
        .route("/drift", get(drift))
        .route("/bundles", get(bundles))
        .route("/jobs", get(jobs))
        .route("/jobs/{id}", get(job))
        .route("/experiments", get(experiments))
        .route("/experiments/{id}", get(experiment))
        .route("/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(state, require_session));
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/login/once/{code}", get(login_once_page).post(login_once))
        .route("/assets/{file}", get(asset))
        .merge(pages)
        .layer(middleware::map_response(security_headers))
}

/// The logged-in operator, as the pages see it.
#[derive(Clone)]
struct Operator {
    id: SessionId,
    csrf: CsrfToken,
}

async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
             img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Pages hold fleet data: never cached. Assets set their own.
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    r
}

/// Finds the session; a `GET` without one goes to `/login`, anything else is 403.
async fn require_session(AxState(s): S, mut req: Request, next: Next) -> Response {
    let found = req
        .headers()
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(session::cookie_value)
        .and_then(|v| s.dashboard.get(v));
    match found {
        Some((id, sess)) => {
            req.extensions_mut().insert(Operator {
                id,
                csrf: sess.csrf,
            });
            next.run(req).await
        }
        None if req.method() == axum::http::Method::GET => Redirect::to("/login").into_response(),
        None => forbidden("no session: log in at /login"),
    }
}

fn forbidden(why: &str) -> Response {
    error_response(StatusCode::FORBIDDEN, "Refused", why)
}

/// A form post passes when its `csrf` field is the session's token and the
/// browser's `Origin` (when sent) is this server; otherwise the reason it
/// is refused.
fn check_form(op: &Operator, headers: &HeaderMap, csrf: &str) -> Result<(), &'static str> {
    if !op.csrf.matches(csrf) {
        return Err("the form's CSRF token is missing or wrong");
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if let (Some(o), Some(h)) = (origin, host) {
        let o = o
            .strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))
            .unwrap_or(o);
        if o != h {
            return Err("cross-origin form post");
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginForm {
    token: String,
}

async fn login_page() -> Html<String> {
    Html(render::login(None))
}

/// Logs in with the operator token; a wrong token gets the form again (401).
async fn login(AxState(s): S, headers: HeaderMap, Form(f): Form<LoginForm>) -> Response {
    if !same_origin(&headers) {
        return forbidden("cross-origin login");
    }
    if s.config.token.is_empty() || !crate::api::token_eq(f.token.trim(), &s.config.token) {
        return (
            StatusCode::UNAUTHORIZED,
            Html(render::login(Some("wrong token"))),
        )
            .into_response();
    }
    start_session(&s)
}

/// `true` unless the browser says the post comes from another origin (no
/// `Origin` header: not a browser's cross-site post).
fn same_origin(headers: &HeaderMap) -> bool {
    match (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) {
        (Some(o), Some(h)) => o.ends_with(&format!("//{h}")),
        _ => true,
    }
}

fn start_session(s: &State) -> Response {
    let (id, _) = s.dashboard.create();
    let mut r = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&id)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// The one-time link's page: a button that posts the code. A `GET` spends
/// nothing, so a link previewer or prefetcher cannot use the code up, and the
/// post comes from this site, so the `SameSite=Strict` cookie it sets is
/// sent on the redirect even when the link was opened from another site.
async fn login_once_page(Path(code): Path<String>) -> Html<String> {
    Html(render::login_once(&code))
}

/// Redeems a one-time code (from this site only); a used or expired one gets
/// the login form (401).
async fn login_once(AxState(s): S, headers: HeaderMap, Path(code): Path<String>) -> Response {
    if !same_origin(&headers) {
        return forbidden("cross-origin login");
    }
    if s.dashboard.redeem(&code) {
        start_session(&s)
    } else {
        (
            StatusCode::UNAUTHORIZED,
            Html(render::login(Some("that login link is used or expired"))),
        )
            .into_response()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CsrfForm {
    csrf: String,
}

async fn logout(
    AxState(s): S,
    axum::Extension(op): axum::Extension<Operator>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(why) = check_form(&op, &headers, &f.csrf) {
        return forbidden(why);
    }
    s.dashboard.remove(&op.id);
    let mut r = Redirect::to("/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie()) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn jobs(AxState(s): S, axum::Extension(op): axum::Extension<Operator>) -> Response {
    page(crate::jobs::list(&s).map(|v| loop_pages::jobs(&op.csrf, &v)))
}

/// A 404 page for a missing thing, any other error as [`page`] shows it.
fn one<T>(r: crate::Result<T>, render: impl FnOnce(T) -> String) -> Response {
    match r {
        Ok(x) => Html(render(x)).into_response(),
        Err(crate::Error::NotFound { what, id }) => error_response(
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("no {what} `{id}`"),
        ),
        Err(e) => page(Err(e)),
    }
}

async fn job(
    AxState(s): S,
    axum::Extension(op): axum::Extension<Operator>,
    Path(id): Path<String>,
) -> Response {
    one(crate::jobs::get(&s, &id), |j| loop_pages::job(&op.csrf, &j))
}

async fn experiments(AxState(s): S, axum::Extension(op): axum::Extension<Operator>) -> Response {
    page(crate::experiments::list(&s).map(|v| loop_pages::experiments(&op.csrf, &v)))
}

async fn experiment(
    AxState(s): S,
    axum::Extension(op): axum::Extension<Operator>,
    Path(id): Path<String>,
) -> Response {
    one(crate::experiments::get(&s, &id), |e| {
        loop_pages::experiment(&op.csrf, &e)
    })
}

/// Renders a page, or the store error as a 500 page naming it.
fn page(r: crate::Result<String>) -> Response {
    match r {
        Ok(html) => Html(html).into_response(),
        Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, "Error", &e.to_string()),
    }
}

async fn fleet(AxState(s): S, axum::Extension(op): axum::Extension<Operator>) -> Response {
    page(views::fleet(&s).map(|v| render::fleet(&op.csrf, &v)))
}

async fn devices(
    AxState(s): S,
    axum::Extension(op): axum::Extension<Operator>,
    q: Result<Query<views::DeviceFilter>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return bad_query(q.err());
    };
    if let Some(st) = q.state.as_deref().map(str::trim).filter(|x| !x.is_empty()) {
        if !views::DeviceClass::ALL.iter().any(|c| c.name() == st) {
            let names: Vec<&str> = views::DeviceClass::ALL.iter().map(|c| c.name()).collect();
            return error_response(
                StatusCode::BAD_REQUEST,
                "Bad request",
                &format!("state `{st}` is not one of {}", names.join(", ")),
            );
        }
    }
    page(views::devices(&s, &q).map(|v| render::devices(&op.csrf, &v)))
}

async fn device(
    AxState(s): S,
    axum::Extension(op): axum::Extension<Operator>,
    Path(id): Path<String>,
) -> Response {
    match views::device(&s, &id) {
        Ok(Some(v)) => Html(render::device(&op.csrf, &v)).into_response(),
        Ok(None) => error_response(
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("no device `{id}`"),
        ),
        Err(e) => page(Err(e)),
    }
}

async fn rollouts(
    AxState(s): S,
    axum::Extension(op): axum::Extension<Operator>,
    q: Result<Query<views::ModelFilter>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return bad_query(q.err());
    };
    Html(render::rollouts(&op.csrf, &views::rollouts(&s, &q))).into_response()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    page: Option<usize>,
}

async fn rollout(
    AxState(s): S,
    axum::Extension(op): axum::Extension<Operator>,
    Path(id): Path<String>,
    q: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return bad_query(q.err());
    };
    match views::rollout(&s, &id, q.page.unwrap_or(1)) {
        Some(v) => Html(render::rollout(&op.csrf, &v)).into_response(),
        None => error_response(
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("no rollout `{id}`"),
        ),
    }
}

async fn control_rollout(
    AxState(s): S,
    axum::Extension(op): axum::Extension<Operator>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(why) = check_form(&op, &headers, &f.csrf) {
        return forbidden(why);
    }
    match s.control_rollout(&id, &action).await {
        Ok(_) => Redirect::to(&format!("/rollouts/{id}")).into_response(),
        Err(e) => error_response(StatusCode::BAD_REQUEST, "Refused", &e.to_string()),
    }
}

async fn drift(
    AxState(s): S,
    axum::Extension(op): axum::Extension<Operator>,
    q: Result<Query<views::DriftFilter>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return bad_query(q.err());
    };
    page(views::drift(&s, &q).map(|v| render::drift(&op.csrf, &v)))
}

async fn bundles(
    AxState(s): S,
    axum::Extension(op): axum::Extension<Operator>,
    q: Result<Query<views::ModelFilter>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return bad_query(q.err());
    };
    page(views::bundles(&s, &q).map(|v| render::bundles(&op.csrf, &v)))
}

/// A page that only says what went wrong, with its status.
fn error_response(status: StatusCode, title: &str, why: &str) -> Response {
    (status, Html(render::error_page(title, why))).into_response()
}

fn bad_query(e: Option<axum::extract::rejection::QueryRejection>) -> Response {
    let why = e.map_or_else(|| "bad query".to_string(), |e| e.body_text());
    error_response(StatusCode::BAD_REQUEST, "Bad request", &why)
}

/// The vendored and own static files, compiled into the binary.
async fn asset(Path(file): Path<String>) -> Response {
    let (body, ty): (&'static [u8], &str) = match file.as_str() {
        "uPlot.iife.min.js" => (
            include_bytes!("assets/uPlot.iife.min.js"),
            "text/javascript",
        ),
        "uPlot.min.css" => (include_bytes!("assets/uPlot.min.css"), "text/css"),
        "dashboard.js" => (include_bytes!("assets/dashboard.js"), "text/javascript"),
        "dashboard.css" => (include_bytes!("assets/dashboard.css"), "text/css"),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    // Ten minutes: the 51 kB chart library is not fetched on every page,
    // and an upgraded server's assets are picked up soon after.
    (
        [
            (header::CONTENT_TYPE, ty),
            (header::CACHE_CONTROL, "public, max-age=600"),
        ],
        body,
    )
        .into_response()
}

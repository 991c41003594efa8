from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from console import review, views
from console.api import api

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("runs/start", views.run_start, name="run_start"),
    path("runs/<uuid:run_id>/", views.run_detail, name="run_detail"),
    path("runs/<uuid:run_id>/cancel", views.run_cancel, name="run_cancel"),
    path("review/", review.queue, name="review_queue"),
    path("review/<uuid:request_id>/", review.detail, name="approval_detail"),
    path("review/<uuid:request_id>/decide", review.decide, name="approval_decide"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/v1/", api.urls),
]
